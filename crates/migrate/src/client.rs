//! The operator's side of a node link: ask a node which connections could move, move them,
//! then commit (after the switch change) or abort.

use crate::wire::{self, Flow, Message, WireError};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long an answer may take: a move of many connections saves and restores each one.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One conversation with a node's link.
pub struct LinkClient {
    stream: TcpStream,
}

fn unexpected(expected: &'static str, got: &Message) -> WireError {
    WireError::Unexpected {
        expected,
        got: wire::name(got),
    }
}

impl LinkClient {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<LinkClient, WireError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(LinkClient { stream })
    }

    fn ask(&mut self, m: &Message) -> Result<Message, WireError> {
        wire::write_message(&mut self.stream, m)?;
        wire::read_message(&mut self.stream)
    }

    /// Up to `limit` connections the node could move now.
    pub fn list(&mut self, limit: usize) -> Result<Vec<Flow>, WireError> {
        match self.ask(&Message::List { limit })? {
            Message::Flows { flows } => Ok(flows),
            m => Err(unexpected("Flows", &m)),
        }
    }

    /// Moves `flows` to the node whose link is `to`: when this returns, the moved ones are
    /// silent on both nodes, waiting for [`LinkClient::commit`]; the refused ones are in
    /// service where they were.
    #[allow(clippy::type_complexity)]
    pub fn move_to(
        &mut self,
        to: SocketAddr,
        flows: Vec<Flow>,
    ) -> Result<(Vec<Flow>, Vec<(Flow, String)>), WireError> {
        match self.ask(&Message::Move { to, flows })? {
            Message::Moved { moved, refused } => Ok((moved, refused)),
            m => Err(unexpected("Moved", &m)),
        }
    }

    /// The switch now sends the moved flows to the new node (holding their packets): go live
    /// there. Returns how many are out of repair mode; [`LinkClient::done`] follows.
    pub fn commit(&mut self) -> Result<usize, WireError> {
        match self.ask(&Message::Commit)? {
            Message::Live { n } => Ok(n),
            m => Err(unexpected("Live", &m)),
        }
    }

    /// Waits until the moved connections are in service on the new node; returns how many.
    pub fn done(mut self) -> Result<usize, WireError> {
        match wire::read_message(&mut self.stream)? {
            Message::Done { n } => Ok(n),
            m => Err(unexpected("Done", &m)),
        }
    }

    /// Every connection stays where it was.
    pub fn abort(mut self) -> Result<(), WireError> {
        match self.ask(&Message::Abort)? {
            Message::Done { .. } => Ok(()),
            m => Err(unexpected("Done", &m)),
        }
    }
}
