//! valvula's integration tests: one binary (ripgrep/cargo style), one module per area.

mod abi;
mod counting;
mod ctl;
mod dropin;
mod fakes;
mod faults;
mod galera;
mod hostile;
mod install;
mod layout;
mod maincf;
mod outage;
mod postfix;
mod process;
mod protocol;
mod ratelimit;
mod store;
mod supervisor;
mod ticket;
