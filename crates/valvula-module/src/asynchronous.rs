//! Storage calls that wait for the database without holding a thread (ABI 0.5).
//!
//! A module that sets [`crate::Module::ASYNC`] writes `process_async` with these
//! calls. Under a daemon of ABI 0.5 the request's future is polled from the daemon's
//! event loop: each call is submitted, the future returns pending, and the daemon polls
//! it again once the answers are written, so the commit of many requests is shared and
//! no thread waits per request. Under an older daemon (or from `process`), the same
//! calls run synchronously and are ready at once, so one body serves both.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::abi::{
    self, vlv_charge, vlv_host_api, vlv_rows, vlv_stmt, vlv_str, vlv_value, vlv_window_state,
};
use crate::storage::{
    Charge, Consumption, Consumptions, Exec, Rows, StorageError, Value, cooked_states, copy_rows,
    raw, raw_charges, raw_window, reaching, status,
};
use crate::{Host, Request};

/// Written by the host in place of the status once a call is answered; never a status.
const UNANSWERED: i32 = i32::MIN;

/// The memory an asynchronous call's answer is written to. On the heap, so it stays
/// where the host writes it; if the waiting future is dropped before the answer came
/// (a module that abandons a call it submitted), it is leaked rather than freed under
/// the host's feet.
struct Answer<T> {
    status: i32,
    out: T,
}

struct Waiting<T> {
    answer: *mut Answer<T>,
}

// SAFETY: the host writes the answer only between two polls of the request, never
// while module code runs, so the block is used by one thread at a time.
unsafe impl<T: Send> Send for Waiting<T> {}

impl<T> Waiting<T> {
    fn new(out: T) -> Self {
        Waiting {
            answer: Box::into_raw(Box::new(Answer {
                status: UNANSWERED,
                out,
            })),
        }
    }

    fn status_ptr(&self) -> *mut i32 {
        // SAFETY: answer is a live allocation of ours until taken or dropped.
        unsafe { &raw mut (*self.answer).status }
    }

    fn out_ptr(&self) -> *mut T {
        // SAFETY: as above.
        unsafe { &raw mut (*self.answer).out }
    }
}

impl<T> Future for Waiting<T> {
    type Output = (i32, T);
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<(i32, T)> {
        let this = self.get_mut();
        if this.answer.is_null() {
            return Poll::Pending;
        }
        // SAFETY: the host wrote the status (if at all) before this poll began.
        let st = unsafe { std::ptr::read_volatile(this.status_ptr()) };
        if st == UNANSWERED {
            // The daemon polls again once every submitted call has its answer.
            return Poll::Pending;
        }
        // SAFETY: answered: the host no longer touches the block; we take it back once.
        let a = unsafe { Box::from_raw(this.answer) };
        this.answer = std::ptr::null_mut();
        Poll::Ready((a.status, a.out))
    }
}

impl<T> Drop for Waiting<T> {
    fn drop(&mut self) {
        if self.answer.is_null() {
            return;
        }
        // SAFETY: read of our own block (see poll).
        let st = unsafe { std::ptr::read_volatile(self.status_ptr()) };
        if st != UNANSWERED {
            // SAFETY: answered, so the host is done with it; freed once.
            drop(unsafe { Box::from_raw(self.answer) });
        }
        // Unanswered: the host may still write it; leaked on purpose.
    }
}

/// The ABI 0.5 table, when this call is being polled by a daemon that has it.
fn polled<'h>(host: &'h Host, req: &Request<'_>) -> Option<&'h vlv_host_api> {
    if !req.polled() {
        return None;
    }
    reaching(
        host.api(),
        std::mem::offset_of!(vlv_host_api, sql_exec_async),
    )
    .ok()
}

/// Output of a charge: the charges handed to the host, their states, the flags.
struct Charged {
    charges: Vec<vlv_charge>,
    states: Vec<Vec<vlv_window_state>>,
    admitted: u32,
    repeated: u32,
    then_status: Vec<i32>,
}

// SAFETY: the raw pointers in `charges` point into `states` (and at the caller's keys
// and windows, only read during submission); the block moves between threads only as
// a whole, between polls.
unsafe impl Send for Charged {}

impl Host {
    /// [`Host::consume_all`] from `process_async`.
    pub async fn consume_all_async(
        &self,
        req: &Request<'_>,
        token: Option<&str>,
        charges: &[Charge<'_>],
    ) -> Result<Consumptions, StorageError> {
        Ok(self.charge_async(req, token, charges, 0, &[]).await?.0)
    }

    /// [`Host::consume_all_async`], and once the charge is admitted (not when refused
    /// or repeated), the writes `then` in the charge's own transaction: an accounting
    /// row committed with its charge, in the same disk flush. Each write is atomic on
    /// its own; one that fails does not undo the charge. The second value holds each
    /// write's result, empty when they did not run. (Under a daemon older than ABI 0.5
    /// the writes follow the charge in transactions of their own.)
    pub async fn consume_all_then_async(
        &self,
        req: &Request<'_>,
        token: Option<&str>,
        charges: &[Charge<'_>],
        then: &[(&str, &[Value])],
    ) -> Result<(Consumptions, Vec<Result<(), StorageError>>), StorageError> {
        self.charge_async(req, token, charges, 0, then).await
    }

    /// What [`Host::consume_all_async`] would answer, without charging.
    pub async fn peek_all_async(
        &self,
        req: &Request<'_>,
        charges: &[Charge<'_>],
    ) -> Result<Consumptions, StorageError> {
        Ok(self
            .charge_async(req, None, charges, abi::VLV_CONSUME_PEEK, &[])
            .await?
            .0)
    }

    /// [`Host::consume`] from `process_async`.
    pub async fn consume_async(
        &self,
        req: &Request<'_>,
        charge: Charge<'_>,
    ) -> Result<Consumption, StorageError> {
        let (mut c, _) = self.charge_async(req, None, &[charge], 0, &[]).await?;
        Ok(c.charges.remove(0))
    }

    async fn charge_async(
        &self,
        req: &Request<'_>,
        token: Option<&str>,
        charges: &[Charge<'_>],
        flags: u32,
        then: &[(&str, &[Value])],
    ) -> Result<(Consumptions, Vec<Result<(), StorageError>>), StorageError> {
        let Some(api) = polled(self, req) else {
            if flags & abi::VLV_CONSUME_PEEK != 0 {
                // No peek of several keys before ABI 0.5: one by one.
                let mut out = Consumptions {
                    admitted: true,
                    repeated: false,
                    charges: Vec::new(),
                };
                for c in charges {
                    let one = self.peek(c.key, c.amount, c.windows)?;
                    out.admitted &= one.admitted;
                    out.charges.push(one);
                }
                return Ok((out, Vec::new()));
            }
            let c = self.consume_all(token, charges)?;
            let mut done = Vec::new();
            if c.admitted && !c.repeated {
                for (sql, params) in then {
                    done.push(self.exec(sql, params).map(|_| ()));
                }
            }
            return Ok((c, done));
        };
        let f = api.consume_async.ok_or(StorageError::NotSupported)?;
        let windows: Vec<Vec<abi::vlv_window>> = charges
            .iter()
            .map(|c| c.windows.iter().map(raw_window).collect())
            .collect();
        let w = Waiting::new(Charged {
            charges: Vec::new(),
            states: charges
                .iter()
                .map(|c| vec![vlv_window_state::default(); c.windows.len()])
                .collect(),
            admitted: 0,
            repeated: 0,
            then_status: vec![abi::VLV_E_NOT_FOUND; then.len()],
        });
        // SAFETY: the block is ours (not yet handed to the host).
        let out = unsafe { &mut *w.out_ptr() };
        out.charges = raw_charges(charges, &windows, &mut out.states);
        let rc = {
            let params: Vec<Vec<vlv_value>> = then
                .iter()
                .map(|(_, p)| p.iter().map(raw).collect())
                .collect();
            let stmts: Vec<vlv_stmt> = then
                .iter()
                .zip(&params)
                .map(|((sql, _), p)| vlv_stmt {
                    sql: vlv_str::from_str(sql),
                    params: p.as_ptr(),
                    n_params: p.len(),
                })
                .collect();
            // SAFETY: the keys, windows, token and statements are read (copied) before
            // the call returns; the charges' out fields, their states, the statuses
            // and the flags live in the heap block, which stays put until answered
            // (see Waiting).
            unsafe {
                f(
                    self.ctx(),
                    req.raw(),
                    vlv_str::from_str(token.unwrap_or("")),
                    flags,
                    out.charges.as_mut_ptr(),
                    out.charges.len(),
                    stmts.as_ptr(),
                    stmts.len(),
                    out.then_status.as_mut_ptr(),
                    &raw mut out.admitted,
                    &raw mut out.repeated,
                    w.status_ptr(),
                )
            }
        };
        if rc != abi::VLV_PENDING {
            status(rc)?;
        }
        let (rc, out) = w.await;
        status(rc)?;
        let per: Vec<bool> = out.charges.iter().map(|c| c.admitted != 0).collect();
        let done: Vec<Result<(), StorageError>> = out
            .then_status
            .iter()
            .take_while(|s| **s != abi::VLV_E_NOT_FOUND)
            .map(|s| status(*s))
            .collect();
        let c = Consumptions {
            admitted: out.admitted != 0,
            repeated: out.repeated != 0,
            charges: out
                .states
                .iter()
                .zip(per)
                .map(|(st, ok)| Consumption {
                    admitted: ok,
                    repeated: out.repeated != 0,
                    windows: cooked_states(st),
                })
                .collect(),
        };
        Ok((c, done))
    }

    /// [`Host::query`] from `process_async`.
    pub async fn query_async(
        &self,
        req: &Request<'_>,
        sql: &str,
        params: &[Value],
    ) -> Result<Rows, StorageError> {
        let Some(api) = polled(self, req) else {
            return self.query(sql, params);
        };
        let f = api.sql_query_async.ok_or(StorageError::NotSupported)?;
        let w = Waiting::new(RowsOut(std::ptr::null_mut(), api.rows_free));
        // The parameters are copied by the host: not kept across the wait (raw
        // pointers are not Send).
        let rc = {
            let raws: Vec<vlv_value> = params.iter().map(raw).collect();
            // SAFETY: SQL and parameters are copied before the call returns; the rows
            // pointer and status live in the heap block (see Waiting).
            unsafe {
                f(
                    self.ctx(),
                    req.raw(),
                    vlv_str::from_str(sql),
                    raws.as_ptr(),
                    raws.len(),
                    &raw mut (*w.out_ptr()).0,
                    w.status_ptr(),
                )
            }
        };
        if rc != abi::VLV_PENDING {
            status(rc)?;
        }
        let (rc, mut rows) = w.await;
        status(rc)?;
        let handle = std::mem::replace(&mut rows.0, std::ptr::null_mut());
        // SAFETY: a handle the host just gave us, used once (copy_rows frees it).
        unsafe { copy_rows(api, handle) }.ok_or(StorageError::NotSupported)
    }

    /// [`Host::exec`] of a write from `process_async`.
    pub async fn exec_async(
        &self,
        req: &Request<'_>,
        sql: &str,
        params: &[Value],
    ) -> Result<Exec, StorageError> {
        match self.write_async(req, None, sql, params).await? {
            Some(e) => Ok(e),
            None => Ok(Exec::default()),
        }
    }

    /// [`Host::exec_once`] from `process_async`.
    pub async fn exec_once_async(
        &self,
        req: &Request<'_>,
        token: &str,
        sql: &str,
        params: &[Value],
    ) -> Result<Option<Exec>, StorageError> {
        self.write_async(req, Some(token), sql, params).await
    }

    async fn write_async(
        &self,
        req: &Request<'_>,
        token: Option<&str>,
        sql: &str,
        params: &[Value],
    ) -> Result<Option<Exec>, StorageError> {
        let Some(api) = polled(self, req) else {
            return match token {
                Some(t) => self.exec_once(t, sql, params),
                None => self.exec(sql, params).map(Some),
            };
        };
        let f = api.sql_exec_async.ok_or(StorageError::NotSupported)?;
        let w = Waiting::new((Exec::default(), 0u32));
        let rc = {
            let raws: Vec<vlv_value> = params.iter().map(raw).collect();
            // SAFETY: token, SQL and parameters are copied before the call returns; the
            // outputs and status live in the heap block (see Waiting).
            unsafe {
                let out = w.out_ptr();
                f(
                    self.ctx(),
                    req.raw(),
                    vlv_str::from_str(token.unwrap_or("")),
                    vlv_str::from_str(sql),
                    raws.as_ptr(),
                    raws.len(),
                    &raw mut (*out).0.affected,
                    &raw mut (*out).0.last_insert_id,
                    &raw mut (*out).1,
                    w.status_ptr(),
                )
            }
        };
        if rc != abi::VLV_PENDING {
            status(rc)?;
        }
        let (rc, (e, repeated)) = w.await;
        status(rc)?;
        Ok((repeated == 0).then_some(e))
    }
}

/// The result handle an asynchronous query answers with, and the host's function that
/// frees it: a handle answered to a call the module no longer waits for (its future
/// dropped) is freed with its block, not leaked.
struct RowsOut(*mut vlv_rows, Option<unsafe extern "C" fn(*mut vlv_rows)>);

// SAFETY: a host handle, usable from any thread; moved with its block between polls.
unsafe impl Send for RowsOut {}

impl Drop for RowsOut {
    fn drop(&mut self) {
        if let Some(free) = self.1
            && !self.0.is_null()
        {
            // SAFETY: a live handle of the host's (not yet copied out), freed once.
            unsafe { free(self.0) }
        }
    }
}
