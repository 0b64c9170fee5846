//! The crate's error type. Variants say who is at fault: the peer, the caller, or the system.

use std::io;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer process exited, was killed, or closed its end.
    #[error("the peer has gone away (it exited, was killed, or closed its end of the channel)")]
    PeerGone,
    /// The peer wrote something the shared-memory protocol forbids. The channel is closed.
    #[error("the peer broke the shared-memory protocol ({0}); the channel has been closed")]
    Corrupt(&'static str),
    /// A message larger than the channel allows; nothing was sent.
    #[error("message of {len} bytes exceeds this channel's limit of {max} bytes (use a buffer)")]
    MessageTooLarge { len: usize, max: usize },
    /// A buffer write or send outside the buffer's capacity; nothing was written.
    #[error("{len} bytes at offset {offset} do not fit in a buffer of {capacity} bytes")]
    BufferOverflow {
        offset: usize,
        len: usize,
        capacity: usize,
    },
    /// A blocking operation's deadline passed.
    #[error("timed out")]
    TimedOut,
    /// The setup conversation with the peer failed.
    #[error("channel setup failed: {0}")]
    Handshake(String),
    /// The server refused the connection.
    #[error("the server refused the channel: {0}")]
    Rejected(String),
    /// Parameters out of range.
    #[error("invalid channel configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: &'static str, source: impl Into<io::Error>) -> Error {
        Error::Io {
            context,
            source: source.into(),
        }
    }
}
