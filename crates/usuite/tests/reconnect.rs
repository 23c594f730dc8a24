//! A mid-tier's call to a bucket survives the connection under it dying, as it does when the
//! mid-tier is restored from a snapshot (CRIU's `--tcp-close` brings its connections back
//! closed) or a bucket's gate drops it: the call is queued on the old connection before the
//! client has noticed, fails in the transport, and is sent once more on a new connection.
//!
//! A relay between the channel and the bucket resets the connection, and the call follows at
//! once on a current-thread runtime, so the channel has had no chance to see the reset first.

use std::net::SocketAddr;

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tonic::transport::Server;
use torpor_usuite::{
    proto::{set_algebra_client::SetAlgebraClient, IntersectRequest},
    setalgebra,
    tier::{self, DataArgs},
};

fn small() -> DataArgs {
    DataArgs {
        docs: 500,
        vocabulary: 50,
        terms_per_doc: 10,
        ..DataArgs::default()
    }
}

/// A Set Algebra bucket of one shard, served on a fresh port until the test ends.
async fn bucket() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let router = Server::builder().add_service(setalgebra::Bucket::new(&small(), 0, 1));
    tokio::spawn(tier::serve(l, router, std::future::pending()));
    addr
}

/// Relays connections to `upstream`; a message on the returned sender resets every
/// connection accepted so far (zero linger: the client side gets a RST) and answers once done.
async fn relay(upstream: SocketAddr) -> (SocketAddr, mpsc::Sender<oneshot::Sender<()>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (reset_tx, mut reset_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
    tokio::spawn(async move {
        let mut killers: Vec<oneshot::Sender<oneshot::Sender<()>>> = Vec::new();
        loop {
            tokio::select! {
                accepted = l.accept() => {
                    let (mut down, _) = accepted.unwrap();
                    let mut up = TcpStream::connect(upstream).await.unwrap();
                    let (kill_tx, kill_rx) = oneshot::channel::<oneshot::Sender<()>>();
                    killers.push(kill_tx);
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            done = kill_rx => {
                                down.set_zero_linger().unwrap();
                                drop(down);
                                done.unwrap().send(()).unwrap();
                            }
                        }
                    });
                }
                Some(done) = reset_rx.recv() => {
                    for k in killers.drain(..) {
                        let (tx, rx) = oneshot::channel();
                        k.send(tx).unwrap();
                        rx.await.unwrap();
                    }
                    done.send(()).unwrap();
                }
            }
        }
    });
    (addr, reset_tx)
}

fn query() -> IntersectRequest {
    IntersectRequest {
        terms: vec!["t0".into(), "t1".into()],
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_bucket_call_on_a_connection_reset_under_it_is_sent_again_on_a_new_one() {
    let (via, reset) = relay(bucket().await).await;
    let channel = tier::bucket_channels(&[via]).remove(0);
    let call = || {
        let mut c = SetAlgebraClient::new(channel.clone());
        async move { c.intersect(query()).await.map(tonic::Response::into_inner) }
    };
    let want = tier::with_retry(call)
        .await
        .expect("first call, fresh connection");
    for round in 0..3 {
        let (done_tx, done_rx) = oneshot::channel();
        reset.send(done_tx).await.unwrap();
        done_rx.await.unwrap();
        let got = tier::with_retry(call)
            .await
            .unwrap_or_else(|s| panic!("round {round}: call after the reset: {s:?}"));
        assert_eq!(got, want, "round {round}");
    }
}

#[tokio::test]
async fn a_bucket_that_answers_with_an_error_is_not_asked_again() {
    let channel = tier::bucket_channels(&[bucket().await]).remove(0);
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let got = tier::with_retry(|| {
        attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut c = SetAlgebraClient::new(channel.clone());
        // No terms: the bucket refuses the query itself.
        async move { c.intersect(IntersectRequest { terms: vec![] }).await }
    })
    .await;
    assert_eq!(got.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(attempts.into_inner(), 1);
}
