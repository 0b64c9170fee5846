//! The tokio integration: an `AsyncChannel` awaits messages and peer death through the reactor.
#![cfg(feature = "tokio")]

use splitos_m2m::{Channel, ChannelConfig, Error, Message, WaitPolicy};
use std::thread;
use std::time::Duration;

fn inline(m: Message<'_>) -> Vec<u8> {
    match m {
        Message::Inline(b) => b.to_vec(),
        Message::Buffer(b) => panic!("expected inline message, got {b:?}"),
    }
}

fn config(wait: WaitPolicy) -> ChannelConfig {
    ChannelConfig {
        ring_bytes: 16 << 10,
        buf_size: 16 << 10,
        buf_count: 4,
        wait,
    }
}

#[test]
fn async_channel_with_tokio() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (a, mut b) = Channel::pair(config(WaitPolicy::Block)).unwrap();
    let echo = thread::spawn(move || {
        for _ in 0..100 {
            let m = inline(b.recv().unwrap());
            b.send(&m).unwrap();
        }
        b
    });
    rt.block_on(async move {
        let mut a = splitos_m2m::AsyncChannel::new(a).unwrap();
        for i in 0..100u32 {
            a.send(&i.to_le_bytes()).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), a.recv_with(inline))
                .await
                .expect("tokio wait timed out")
                .unwrap();
            assert_eq!(got, i.to_le_bytes());
        }
        let b = echo.join().unwrap();
        drop(b);
        let err = tokio::time::timeout(Duration::from_secs(5), a.readable())
            .await
            .expect("peer death did not wake the task");
        assert!(matches!(err, Err(Error::PeerGone)));
    });
}
