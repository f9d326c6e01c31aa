//! In-process modules for chain and failure tests: no dlopen needed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use valvula_policy::{Action, Reply, Request};
use valvulad::dispatch::{Handler, HandlerError};
use valvulad::host::ModuleSet;

pub enum Behaviour {
    Answer(Option<Reply>),
    /// Answers `info <attr>=<value>`, to show what the module saw.
    Echo(&'static str),
    Fail,
    Panic,
    Sleep(Duration),
}

pub struct Fake {
    pub name: String,
    pub behaviour: Behaviour,
    pub calls: AtomicUsize,
    pub trail: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    pub fn new(name: &str, behaviour: Behaviour) -> Arc<Fake> {
        Arc::new(Fake {
            name: name.into(),
            behaviour,
            calls: AtomicUsize::new(0),
            trail: Arc::new(Mutex::new(Vec::new())),
        })
    }
    pub fn with_trail(
        name: &str,
        behaviour: Behaviour,
        trail: &Arc<Mutex<Vec<String>>>,
    ) -> Arc<Fake> {
        Arc::new(Fake {
            name: name.into(),
            behaviour,
            calls: AtomicUsize::new(0),
            trail: trail.clone(),
        })
    }
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Handler for Fake {
    fn name(&self) -> &str {
        &self.name
    }
    fn handle(&self, req: &Request) -> Result<Option<Reply>, HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.trail.lock().unwrap().push(self.name.clone());
        match &self.behaviour {
            Behaviour::Answer(r) => Ok(r.clone()),
            Behaviour::Echo(attr) => Ok(Some(
                Reply::new(
                    Action::Info,
                    format!("{attr}={}", req.get(attr).unwrap_or("<absent>")),
                )
                .unwrap(),
            )),
            Behaviour::Fail => Err(HandlerError::Status(-4)),
            Behaviour::Panic => panic!("fake module panics"),
            Behaviour::Sleep(d) => {
                std::thread::sleep(*d);
                Ok(Some(Reply::new(Action::Ok, "slept").unwrap()))
            }
        }
    }
}

pub fn reply(action: Action, text: &str) -> Option<Reply> {
    Some(Reply::new(action, text).unwrap())
}

pub fn set(handlers: Vec<Arc<Fake>>, timeout_ms: u64) -> ModuleSet {
    ModuleSet::from_handlers(
        handlers
            .into_iter()
            .map(|h| h as Arc<dyn Handler>)
            .collect(),
        valvula_tests::daemon::settings(timeout_ms),
    )
}
