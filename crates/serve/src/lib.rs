//! `splitos serve` as a library: a static web server on the split architecture.
//!
//! Two parts, which run in two processes:
//! - [`supervisor`]: runs the TCP server and the file server as threads, starts the HTTP
//!   application as a child process, restarts it when it dies and replaces it on a reload
//!   without dropping a connection ([`control`] is how `splitos reload` asks for one);
//! - [`app`]: one instance of the HTTP application, an event loop that answers from the file
//!   cache through shared memory and hands its connections to its successor;
//! - [`upgrade`] (over [`handover`]'s records): replacing a running supervisor, servers
//!   included, by a new binary without closing a connection;
//! - [`rundir`]: the supervisor's private runtime directory (its servers' sockets, and the
//!   status file `splitos status` reads), and finding the running instances.
//!
//! HTTP itself (parsing, the connection loop, responses, listings, log lines) is
//! `splitos-http`'s; this crate wires it to the servers. The `splitos` command adds argument
//! parsing and the messages a person reads; the supervisor starts instances through whatever
//! command it is given ([`supervisor::AppCommand`]), which must end up in [`app::run`].

#![forbid(unsafe_code)]

pub mod agent;
pub mod app;
pub mod control;
pub mod direct;
pub mod handover;
pub mod rundir;
pub mod supervisor;
pub mod upgrade;
