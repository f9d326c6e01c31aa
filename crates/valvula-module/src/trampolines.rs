//! The `extern "C"` functions behind [`crate::export_module!`]. Each one runs the
//! module's code under `catch_unwind`: a panic must never unwind into the host (that is
//! undefined behaviour across a C ABI), so it becomes `VLV_E_FAILED` and a log line.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::abi::{self, vlv_host_api, vlv_module_ctx, vlv_module_def, vlv_request, vlv_str};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::{Action, Error, Host, LogLevel, Module, Request, Ticks, Verdict};

/// What the `state` pointer given to the host points at.
struct Slot<M> {
    host: Host,
    module: M,
}

/// Builds the definition `export_module!` exports.
pub const fn definition<M: Module>(
    name: &'static str,
    version: &'static str,
    description: &'static str,
    flags: u32,
) -> vlv_module_def {
    vlv_module_def {
        magic: abi::VLV_MODULE_MAGIC,
        abi_major: abi::VLV_ABI_MAJOR,
        abi_minor: abi::VLV_ABI_MINOR,
        struct_size: std::mem::size_of::<vlv_module_def>() as u32,
        flags,
        name: vlv_str::from_str(name),
        version: vlv_str::from_str(version),
        description: vlv_str::from_str(description),
        init: Some(init::<M>),
        process: Some(process::<M>),
        reconf: Some(reconf::<M>),
        close: Some(close::<M>),
        tick: Some(tick::<M>),
        process_poll: if M::ASYNC {
            Some(process_poll::<M>)
        } else {
            None
        },
        process_drop: if M::ASYNC { Some(process_drop) } else { None },
    }
}

/// Runs a `process_async` future whose storage calls are synchronous (called from
/// `process`): it is ready at the first poll.
pub(crate) fn ready_now<F: Future<Output = Result<Verdict, Error>>>(
    f: F,
) -> Result<Verdict, Error> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(
            "process_async waited for something other than the host's storage calls; \
             called through process() it must finish at once"
                .into(),
        ),
    }
}

/// What `*call` points at between polls of one request.
struct Call<'m> {
    /// Declared first: dropped before the request it borrows.
    future: Pin<Box<dyn Future<Output = Result<Verdict, Error>> + Send + 'm>>,
    _request: Box<Request<'m>>,
}

fn panic_text(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// # Safety
/// `state` must be a pointer this module's `init` returned and `close` has not freed.
unsafe fn slot<'a, M>(state: *mut c_void) -> Option<&'a Slot<M>> {
    // SAFETY: per the contract above the pointer is a live Box<Slot<M>> or NULL.
    unsafe { state.cast::<Slot<M>>().as_ref() }
}

unsafe extern "C" fn init<M: Module>(
    api: *const vlv_host_api,
    ctx: *mut vlv_module_ctx,
    state: *mut *mut c_void,
) -> i32 {
    // SAFETY: the host passes a table that lives until the process exits.
    let Some(api) = (unsafe { api.as_ref() }) else {
        return abi::VLV_E_INVALID;
    };
    if state.is_null() {
        return abi::VLV_E_INVALID;
    }
    let host = Host::new(api, ctx);
    if cfg!(panic = "abort") {
        // Every hook catches panics so that one never takes the daemon down; built
        // with panic = "abort" there is nothing to catch: the first panic would end
        // valvulad and every listener with it.
        host.log(
            LogLevel::Error,
            "built with panic = \"abort\": a panic would abort valvulad itself; \
             build the module with panic = \"unwind\" (Cargo's default) and load it again",
        );
        return abi::VLV_E_FAILED;
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        crate::log_bridge::install(host);
        // This module's own panic hook (a cdylib has its own std): the place goes to the
        // daemon's log, the message follows from the trampoline that caught it. The
        // default hook would print to stderr and, with RUST_BACKTRACE set, capture and
        // symbolize a backtrace per panic (about 100 MB of debug info, measured).
        std::panic::set_hook(Box::new(move |info| {
            let at = info
                .location()
                .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
            host.log(LogLevel::Error, &format!("panic{at}"));
        }));
        M::init(host)
    }));
    match r {
        Ok(Ok(module)) => {
            let b = Box::new(Slot { host, module });
            // SAFETY: state was checked non-NULL; the host gave us a place to write.
            unsafe { *state = Box::into_raw(b).cast() };
            abi::VLV_OK
        }
        Ok(Err(e)) => {
            host.log(LogLevel::Error, &format!("init failed: {e}"));
            abi::VLV_E_FAILED
        }
        Err(p) => {
            host.log(
                LogLevel::Error,
                &format!("init panicked: {}", panic_text(&*p)),
            );
            abi::VLV_E_FAILED
        }
    }
}

unsafe extern "C" fn process<M: Module>(state: *mut c_void, req: *mut vlv_request) -> i32 {
    // SAFETY: the host passes back the state init returned.
    let Some(slot) = (unsafe { slot::<M>(state) }) else {
        return abi::VLV_E_INVALID;
    };
    let request = Request::new(slot.host.api(), req, false);
    let r = catch_unwind(AssertUnwindSafe(|| slot.module.process(&request)));
    finish(slot, req, r)
}

unsafe extern "C" fn process_poll<M: Module>(
    state: *mut c_void,
    req: *mut vlv_request,
    call: *mut *mut c_void,
) -> i32 {
    // SAFETY: the host passes back the state init returned.
    let Some(slot) = (unsafe { slot::<M>(state) }) else {
        return abi::VLV_E_INVALID;
    };
    if call.is_null() {
        return abi::VLV_E_INVALID;
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: call is the host's slot for this request's call pointer.
        let mut current = unsafe { (*call).cast::<Call<'static>>() };
        if current.is_null() {
            let request = Box::new(Request::new(slot.host.api(), req, true));
            // SAFETY: the module lives until close, which the host calls only after
            // every call ended or was dropped; the request box lives in the Call with
            // the future, and the host passes the same req to every poll of the call
            // (header, ABI 0.5). So both outlive the future, which is dropped first.
            let (module, r): (&'static M, &'static Request<'static>) = unsafe {
                (
                    &*std::ptr::from_ref(&slot.module),
                    &*std::ptr::from_ref::<Request<'_>>(&*request).cast::<Request<'static>>(),
                )
            };
            current = Box::into_raw(Box::new(Call {
                future: Box::pin(module.process_async(r)),
                _request: request,
            }));
            // SAFETY: as above; the host keeps the pointer for the next poll or drop.
            unsafe { *call = current.cast() };
        }
        // SAFETY: current is the live Call this request's first poll made.
        let c = unsafe { &mut *current };
        c.future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    }));
    let blocking = matches!(&r, Ok(Poll::Ready(Err(e))) if e.is::<crate::RunBlocking>());
    let r = match r {
        Ok(Poll::Pending) => return abi::VLV_PENDING,
        Ok(Poll::Ready(r)) => Ok(r),
        Err(p) => Err(p),
    };
    // Finished (or panicked): the call is freed here, never polled again.
    // SAFETY: the pointer this function stored; taken back once and cleared.
    let done = unsafe { std::mem::replace(&mut *call, std::ptr::null_mut()) };
    if !done.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: a Box<Call> made above, freed once.
            drop(unsafe { Box::from_raw(done.cast::<Call<'static>>()) })
        }));
    }
    if blocking {
        return abi::VLV_BLOCKING;
    }
    finish(slot, req, r)
}

unsafe extern "C" fn process_drop(_state: *mut c_void, call: *mut c_void) {
    if call.is_null() {
        return;
    }
    // SAFETY: the host gives back a call pointer process_poll made, once, and never
    // polls it again.
    let c = unsafe { Box::from_raw(call.cast::<Call<'static>>()) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(c)));
}

/// Hands a finished `process` or `process_poll` call's verdict to the host.
fn finish<M: Module>(
    slot: &Slot<M>,
    req: *mut vlv_request,
    r: std::thread::Result<Result<Verdict, Error>>,
) -> i32 {
    let api = slot.host.api();
    match r {
        Ok(Ok(v)) if v.action == Action::Dunno && v.text.is_empty() => abi::VLV_OK,
        Ok(Ok(mut v)) => {
            let Some(set) = api.reply_set else {
                return abi::VLV_E_FAILED;
            };
            // A text built from request data (a 2,000-byte sender) may pass the host's
            // limit: cut it rather than fail the request over its length.
            let max = abi::VLV_REPLY_TEXT_MAX as usize;
            if v.text.len() > max {
                let mut cut = max - 3;
                while !v.text.is_char_boundary(cut) {
                    cut -= 1;
                }
                v.text.truncate(cut);
                v.text.push_str("...");
            }
            // SAFETY: req is the live request of this call; the text is copied by the
            // host before reply_set returns.
            let rc = unsafe { set(req, action_code(v.action), vlv_str::from_str(&v.text)) };
            if rc != abi::VLV_OK {
                slot.host.log(
                    LogLevel::Error,
                    &format!(
                        "the host refused the verdict {} {:?} (status {rc})",
                        v.action, v.text
                    ),
                );
            }
            rc
        }
        Ok(Err(e)) => {
            // A database that is away is no fault of the module: say so, so the daemon
            // does not quarantine it (the daemon logs the outage itself).
            if let Some(crate::StorageError::Unavailable) = e.downcast_ref::<crate::StorageError>()
            {
                return abi::VLV_E_UNAVAILABLE;
            }
            slot.host
                .log(LogLevel::Error, &format!("request failed: {e}"));
            abi::VLV_E_FAILED
        }
        Err(p) => {
            slot.host
                .log(LogLevel::Error, &format!("panicked: {}", panic_text(&*p)));
            abi::VLV_E_FAILED
        }
    }
}

unsafe extern "C" fn reconf<M: Module>(state: *mut c_void) -> i32 {
    // SAFETY: the host passes back the state init returned.
    let Some(slot) = (unsafe { slot::<M>(state) }) else {
        return abi::VLV_E_INVALID;
    };
    match catch_unwind(AssertUnwindSafe(|| slot.module.reconf())) {
        Ok(Ok(())) => abi::VLV_OK,
        Ok(Err(e)) => {
            slot.host
                .log(LogLevel::Error, &format!("reconf failed: {e}"));
            abi::VLV_E_FAILED
        }
        Err(p) => {
            slot.host.log(
                LogLevel::Error,
                &format!("reconf panicked: {}", panic_text(&*p)),
            );
            abi::VLV_E_FAILED
        }
    }
}

unsafe extern "C" fn tick<M: Module>(state: *mut c_void, kinds: u32, now: i64) {
    // SAFETY: the host passes back the state init returned.
    let Some(slot) = (unsafe { slot::<M>(state) }) else {
        return;
    };
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| slot.module.tick(Ticks(kinds), now))) {
        slot.host.log(
            LogLevel::Error,
            &format!("tick panicked: {}", panic_text(&*p)),
        );
    }
}

unsafe extern "C" fn close<M: Module>(state: *mut c_void) {
    if state.is_null() {
        return;
    }
    // SAFETY: the host calls close once, last, with the pointer init returned; we take
    // the box back and nothing uses the pointer afterwards.
    let slot = unsafe { Box::from_raw(state.cast::<Slot<M>>()) };
    let host = slot.host;
    if let Err(p) = catch_unwind(AssertUnwindSafe(move || slot.module.close())) {
        host.log(
            LogLevel::Error,
            &format!("close panicked: {}", panic_text(&*p)),
        );
    }
}

fn action_code(a: Action) -> u32 {
    match a {
        Action::Dunno => abi::VLV_ACTION_DUNNO,
        Action::Ok => abi::VLV_ACTION_OK,
        Action::Reject => abi::VLV_ACTION_REJECT,
        Action::Defer => abi::VLV_ACTION_DEFER,
        Action::DeferIfPermit => abi::VLV_ACTION_DEFER_IF_PERMIT,
        Action::DeferIfReject => abi::VLV_ACTION_DEFER_IF_REJECT,
        Action::Discard => abi::VLV_ACTION_DISCARD,
        Action::Hold => abi::VLV_ACTION_HOLD,
        Action::Prepend => abi::VLV_ACTION_PREPEND,
        Action::Redirect => abi::VLV_ACTION_REDIRECT,
        Action::Bcc => abi::VLV_ACTION_BCC,
        Action::Filter => abi::VLV_ACTION_FILTER,
        Action::Warn => abi::VLV_ACTION_WARN,
        Action::Info => abi::VLV_ACTION_INFO,
        Action::Raw => abi::VLV_ACTION_RAW,
    }
}
