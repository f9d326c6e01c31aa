use std::marker::PhantomData;

use crate::abi::{self, vlv_host_api, vlv_request, vlv_str};

/// The request being decided, borrowed from the host for one `process` call.
pub struct Request<'a> {
    api: &'static vlv_host_api,
    raw: *mut vlv_request,
    /// Polled by a daemon of ABI 0.5 (`process_poll`): the `_async` storage calls are
    /// submitted rather than run at once.
    polled: bool,
    _call: PhantomData<&'a ()>,
}

// SAFETY: the request is only read through the host's request_get/request_attr, which
// may be called from any thread while the call is live; a `process_async` future that
// holds it is polled by one thread at a time.
unsafe impl Sync for Request<'_> {}
// SAFETY: as above.
unsafe impl Send for Request<'_> {}

fn as_str<'a>(s: vlv_str) -> &'a str {
    if s.ptr.is_null() || s.len == 0 {
        return "";
    }
    // SAFETY: the host hands out (ptr, len) pairs valid until process() returns, which
    // outlives 'a (a Request never escapes the call).
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr.cast::<u8>(), s.len) };
    // The host only hands out UTF-8; anything else reads as empty rather than UB.
    std::str::from_utf8(bytes).unwrap_or("")
}

impl<'a> Request<'a> {
    pub(crate) fn new(api: &'static vlv_host_api, raw: *mut vlv_request, polled: bool) -> Self {
        Request {
            api,
            raw,
            polled,
            _call: PhantomData,
        }
    }

    pub(crate) fn raw(&self) -> *mut vlv_request {
        self.raw
    }

    /// Whether the request is being decided on the daemon's event loop (a
    /// `process_async` polled by a daemon of ABI 0.5), where nothing may block: return
    /// [`crate::RunBlocking`] from its first step to be called on a worker thread.
    pub fn polled(&self) -> bool {
        self.polled
    }

    /// The value of attribute `name` (the last one if Postfix sent it twice); `Some("")`
    /// when sent empty, `None` when not sent.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        let f = self.api.request_get?;
        let mut v = vlv_str::EMPTY;
        // SAFETY: raw is the live request of this call; name is borrowed for the call.
        let rc = unsafe { f(self.raw, vlv_str::from_str(name), &mut v) };
        (rc == abi::VLV_OK).then(|| as_str(v))
    }

    /// Like [`Request::get`], but an empty value reads as absent.
    pub fn get_nonempty(&self, name: &str) -> Option<&'a str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    /// Every attribute in wire order, unknown ones included.
    pub fn attributes(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        let f = self.api.request_attr;
        (0usize..).map_while(move |i| {
            let f = f?;
            let (mut n, mut v) = (vlv_str::EMPTY, vlv_str::EMPTY);
            // SAFETY: raw is the live request of this call.
            let rc = unsafe { f(self.raw, i, &mut n, &mut v) };
            (rc == abi::VLV_OK).then(|| (as_str(n), as_str(v)))
        })
    }

    pub fn protocol_state(&self) -> Option<&'a str> {
        self.get_nonempty("protocol_state")
    }
    pub fn sender(&self) -> Option<&'a str> {
        self.get("sender")
    }
    pub fn recipient(&self) -> Option<&'a str> {
        self.get_nonempty("recipient")
    }
    /// The SASL login, `None` for unauthenticated mail (Postfix sends it empty).
    pub fn sasl_username(&self) -> Option<&'a str> {
        self.get_nonempty("sasl_username")
    }
    pub fn client_address(&self) -> Option<&'a str> {
        self.get_nonempty("client_address")
    }
    pub fn queue_id(&self) -> Option<&'a str> {
        self.get_nonempty("queue_id")
    }
    pub fn instance(&self) -> Option<&'a str> {
        self.get_nonempty("instance")
    }
    /// The token for [`crate::Host::consume_once`] / [`crate::Host::exec_once`] that
    /// makes a charge once per message, stage and (at RCPT) recipient: Postfix's
    /// `instance` names the message, and a request it re-sends after its policy timeout
    /// carries the same values. `scope` keeps charges of one module apart (a policy
    /// name). `None` without an instance. A token of any length works: the host stores
    /// a long one as a prefix and a digest of the whole.
    pub fn once_token(&self, scope: &str) -> Option<String> {
        let instance = self.instance()?;
        let state = self.protocol_state().unwrap_or("").to_ascii_uppercase();
        let rcpt = if state == "RCPT" {
            self.recipient().unwrap_or("").to_ascii_lowercase()
        } else {
            String::new()
        };
        Some(format!("{scope}\x1f{instance}\x1f{state}\x1f{rcpt}"))
    }
    /// `recipient_count` as Postfix sends it; absent or not a number reads as 0.
    pub fn recipient_count(&self) -> u64 {
        self.get("recipient_count")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
    /// `size` (or valvula's `message_size`); absent or not a number reads as 0.
    pub fn size(&self) -> u64 {
        self.get("size")
            .or_else(|| self.get("message_size"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}
