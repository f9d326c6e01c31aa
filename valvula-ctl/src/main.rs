//! valvula-ctl: the management shell. Its verbs arrive with the valvula-ctl issue; until
//! then it says so instead of pretending.

fn main() {
    eprintln!(
        "valvula-ctl: not built yet; see the valvula-ctl issue (main.cf editing, plans, usage)"
    );
    std::process::exit(2);
}
