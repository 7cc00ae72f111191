//! `Refresh`: one session's permission refresh state — the forwarded
//! request it replays, the bootstrap call in flight, and when the next one
//! is due (periodic `permissions.refreshSeconds`, or a failed call's retry).
//!
//! Boxed by the session: it is only busy now and then, and inline it would
//! grow every connection's task past its allocation size class.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::backend::{Bootstrap, BootstrapError, PERIODIC};
use crate::config::seconds;
use crate::gateway::Gateway;

/// A refresh's bootstrap call, running beside the session's loop.
type Call = Pin<Box<dyn Future<Output = Result<Bootstrap, BootstrapError>> + Send>>;

/// One session's refreshes.
pub struct Refresh {
    /// The forwarded bootstrap request, replayed by every refresh.
    request: Vec<(HeaderName, HeaderValue)>,
    /// The call in flight, if any.
    call: Option<Call>,
    /// Generation of the call the timer starts next: [`PERIODIC`], or the
    /// control message's whose call failed.
    generation: u64,
    /// Failed calls in a row (the backoff).
    failures: u32,
    /// When the timer starts the next call.
    due: Option<Instant>,
}

impl Refresh {
    /// The state of a session whose bootstrap request is `request`; the
    /// first periodic refresh is scheduled once it is authorised.
    pub fn new(request: Vec<(HeaderName, HeaderValue)>, gateway: &Gateway, now: Instant) -> Box<Refresh> {
        Box::new(Refresh { request, call: None, generation: PERIODIC, failures: 0, due: periodic(gateway, now) })
    }

    /// Schedules the first periodic refresh, for a session authorised at `now`.
    pub fn schedule_periodic(&mut self, gateway: &Gateway, now: Instant) {
        self.due = periodic(gateway, now);
    }

    /// What the kept request holds, bytes, roughly (per-connection budget).
    pub fn request_bytes(&self) -> usize {
        crate::backend::request_bytes(&self.request)
    }

    /// Whether a call is in flight.
    pub fn is_running(&self) -> bool {
        self.call.is_some()
    }

    /// When the timer must start the next call.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Starts a call for a control message of `generation` (a pending
    /// retry of an older one is superseded).
    pub fn start(&mut self, gateway: &Arc<Gateway>, generation: u64) {
        self.generation = generation;
        self.failures = 0;
        self.due = None;
        self.call = Some(call(gateway.clone(), self.request.clone(), generation));
    }

    /// Starts the due call, if it is due at `now` and none is running.
    pub fn start_if_due(&mut self, gateway: &Arc<Gateway>, now: Instant) {
        if self.due.is_some_and(|due| now >= due) {
            self.due = None;
            if self.call.is_none() {
                self.call = Some(call(gateway.clone(), self.request.clone(), self.generation));
            }
        }
    }

    /// The answer of the call in flight (pending without one).
    pub fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bootstrap, BootstrapError>> {
        let Some(call) = self.call.as_mut() else { return Poll::Pending };
        let answer = std::task::ready!(call.as_mut().poll(cx));
        self.call = None;
        Poll::Ready(answer)
    }

    /// The call answered: the next is the periodic one.
    pub fn succeeded(&mut self, gateway: &Gateway, now: Instant) {
        self.failures = 0;
        self.generation = PERIODIC;
        self.due = periodic(gateway, now);
    }

    /// The call failed: retry after 1 s doubling to 30 s, jittered.
    pub fn failed(&mut self, now: Instant) {
        let wait = Duration::from_secs(1u64 << self.failures.min(5)).min(Duration::from_secs(30));
        self.failures = self.failures.saturating_add(1);
        self.due = Some(now + jittered(wait));
    }
}

fn call(gateway: Arc<Gateway>, request: Vec<(HeaderName, HeaderValue)>, generation: u64) -> Call {
    Box::pin(async move { gateway.backend.bootstrap(request, None, &gateway.admission, generation).await })
}

/// When the periodic refresh after `now` is due (`permissions.refreshSeconds`).
fn periodic(gateway: &Gateway, now: Instant) -> Option<Instant> {
    let every = gateway.config.permissions.refresh_seconds;
    (every > 0.0).then(|| now + jittered(seconds(every)))
}

/// `base` ±20 %, so connections opened together do not refresh together.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}
