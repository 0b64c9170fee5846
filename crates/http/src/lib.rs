//! HTTP/1.1 for Split-OS's static file serving, one concern per module, shared by the HTTP
//! application and the TCP server's direct path, so both parse and answer alike.
//!
//! - [`request`]: the request head, with size limits (414/431) and request-smuggling defences
//!   (conflicting or duplicated `Content-Length`, `Transfer-Encoding` with `Content-Length`,
//!   obsolete line folding → 400);
//! - [`target`]: the request target, percent-decoded into a path;
//! - [`range`]: `Range` headers against a known length;
//! - [`conditional`]: `If-Match`, `If-None-Match`, `If-Modified-Since`, `If-Unmodified-Since`,
//!   `If-Range`, evaluated in the order RFC 9110 §13.2.2 gives;
//! - [`mime`]: `Content-Type` by file extension;
//! - [`respond`]: a request for a static file turned into a response head and file ranges,
//!   over an abstract file store;
//! - [`conn`]: one connection without I/O — received bytes in, responses out, pipelining,
//!   what to do with bodies and odd requests, header and idle timeouts;
//! - [`listing`]: the HTML listing of a directory without an index;
//! - [`access_log`]: common-log-format lines.
//!
//! Tokenizing is httparse's (the parser hyper uses); this crate adds the semantics and the
//! limits. Nothing here panics on any input (property-tested).

#![forbid(unsafe_code)]

pub mod access_log;
pub mod conditional;
pub mod conn;
pub mod listing;
pub mod mime;
pub mod range;
pub mod request;
pub mod respond;
pub mod target;

/// A request that must be refused, with the status to refuse it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{status} {reason}")]
pub struct HttpError {
    pub status: u16,
    pub reason: &'static str,
}

impl HttpError {
    pub const fn new(status: u16, reason: &'static str) -> HttpError {
        HttpError { status, reason }
    }
}
