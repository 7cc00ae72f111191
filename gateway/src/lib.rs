//! high-templar gateway: a websocket gateway that gives an existing
//! HTTP-only API real-time push, drop-in compatible with high-templar 3.x.
//!
//! A browser opens a websocket; the gateway asks the backend who the user is
//! and which rooms they may join (`bootstrap/`); the client subscribes to
//! rooms; triggers published by the backend are fanned out to every
//! matching subscription. The contract is `DESIGN.md` §2–§4 of the project.
//!
//! # Module map
//!
//! Pure logic (no I/O, unit-tested exhaustively):
//! - [`room`]: canonical rooms, permission and delivery relations.
//! - [`index`]: `RoomIndex`, the subscription index; a trigger costs
//!   O(subscriptions reached).
//! - [`protocol`]: client frames in, reply frames out.
//! - [`trigger`]: trigger bodies (`{"rooms":[…],"data":…}`), and
//!   `Published`: a trigger or a control message.
//! - [`control`]: control messages (`refresh`, `disconnect`).
//! - [`identity`]: the user identity in a bootstrap answer.
//! - [`forwarding`]: which client request data goes to the backend.
//! - [`origin`]: `OriginPolicy`, which browser origins may connect.
//! - [`breaker`]: `CircuitBreaker`, when to stop calling a failing backend.
//! - [`config`]: the YAML configuration and its validation.
//! - [`write_through`]: `WriteThroughPolicy`, whether the fan-out writes
//!   deliveries into idle sockets itself or queues them.
//!
//! State and I/O:
//! - [`hub`]: `Hub`, the process's subscriptions and the fan-out to
//!   per-session bounded queues.
//! - [`outbound`]: `OutboundQueue`, one session's bounded queue of publish
//!   frames, its slow-consumer flag, and its websocket (`QueueSocket`), so
//!   the fan-out can write a delivery through to an idle socket.
//! - [`backend`]: `BootstrapClient`, the call to the existing API.
//! - [`admission`]: `Admission`, bootstrap calls in flight at once and
//!   their bounded queue.
//! - [`answer_cache`]: `AnswerCache`, answers kept for identical connects.
//! - [`coalesce`]: `Coalescer`, identical concurrent bootstrap requests
//!   share one call.
//! - [`session`]: one websocket connection, bootstrap to close.
//! - [`refresh`]: `Refresh`, one session's permission refreshes.
//! - [`broker`]: the `Broker` trait and its transports.
//! - [`http`]: routes: `/ws/`, `/trigger`, `/healthz`, `/readyz`, `/metrics`.
//! - [`gateway`]: `Gateway`, the state shared by all of the above.
//! - [`listener`]: `Listener`, the accept loop and HTTP/1 up to the
//!   upgrade, with its header and write deadlines and pending-connection cap.
//! - [`linger`]: `ServedStream`, the accepted stream and its lingering close.
//! - [`websocket`]: the upgrade to a websocket, and `ClientStream`, the
//!   accepted stream under it, which the fan-out can write a frame to.
//! - [`server`]: `Server`, bind, serve, graceful shutdown.
//! - [`metrics`]: Prometheus families.
//! - [`log_throttle`]: `LogThrottle`, rate-limited warnings for events
//!   untrusted input can repeat.
//! - [`tls`]: TLS client configurations (CA, client certificate) for
//!   `amqps://` and `https://`, and explained TLS failures.
//! - [`cli`]: command-line flags and environment variables.
//! - [`process`]: logging setup and termination signals (shared with the operator).

#![forbid(unsafe_code)]

pub mod admission;
pub mod answer_cache;
pub mod backend;
pub mod breaker;
pub mod broker;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod control;
pub mod forwarding;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod identity;
pub mod index;
pub mod linger;
pub mod listener;
pub mod log_throttle;
pub mod metrics;
pub mod origin;
pub mod outbound;
pub mod process;
pub mod protocol;
pub mod refresh;
pub mod room;
pub mod server;
pub mod session;
pub mod tls;
pub mod trigger;
pub mod websocket;
pub mod write_through;
