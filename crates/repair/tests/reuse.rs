//! A socket that went through repair mode keeps SO_REUSEADDR: the kernel clears it when repair
//! mode ends, and a connection without it that outlives its process (its FIN waiting for a
//! peer that no longer answers) keeps the service's listener from being bound again. Found on
//! a failover node that could not listen after a restart: every connection it had
//! checkpointed (pause, save, resume) blocked the address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use splitos_repair::socket;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use support::{nft, sh, Netns};

#[test]
fn a_paused_and_resumed_connection_does_not_block_its_listener_address() {
    support::require_root_and_nft();
    let ns = Netns::new("reuse");
    ns.run(|| {
        sh("ip", &["link", "set", "lo", "up"]);
        sh("ip", &["addr", "add", "198.18.0.1/32", "dev", "lo"]);
        // std binds listeners with SO_REUSEADDR; accepted sockets inherit it.
        let listener = TcpListener::bind("198.18.0.1:7100").unwrap();
        let client = TcpStream::connect("198.18.0.1:7100").unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert!(rustix::net::sockopt::socket_reuseaddr(server.as_fd()).unwrap());
        socket::pause(server.as_fd()).unwrap().resume().unwrap();
        assert!(
            rustix::net::sockopt::socket_reuseaddr(server.as_fd()).unwrap(),
            "repair mode took SO_REUSEADDR away"
        );
        // The client stops answering; the server's socket outlives its owner in FIN_WAIT1.
        let port = client.local_addr().unwrap().port();
        nft(&format!(
            "table ip r {{
                chain o {{
                    type filter hook output priority 0; policy accept;
                    tcp dport {port} drop
                }}
            }}"
        ));
        server.write_all(b"bye").unwrap();
        drop(server);
        drop(listener);
        let again = TcpListener::bind("198.18.0.1:7100");
        assert!(again.is_ok(), "the address stayed blocked: {again:?}");
        drop(client);
    });
}
