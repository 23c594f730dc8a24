//! What every tier shares: the data-set flags, serving a tonic router on a listener until
//! shutdown, and the mid-tier's fan-out to its buckets (lazy channels that reconnect, one retry
//! when a bucket is unreachable: a bucket that was just restored comes back with its old
//! connections closed).
//!
//! Every connection, accepted or dialled, has TCP_NODELAY. A tonic server writes a response as
//! two writes (headers and message, then the trailers a few microseconds later); with Nagle's
//! algorithm on, the small second write waits for the ACK of the first, which the peer delays
//! by up to 40 ms. `Server::tcp_nodelay` does not reach a listener handed over with
//! `serve_with_incoming`, so the accepted sockets get it here.

use std::{error::Error as _, future::Future, net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::{
    server::{Router, TcpIncoming},
    Channel, Endpoint,
};

use crate::cli::TierError;

/// Data-set sizes and seed: every tier of a service must get the same.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Seed of the data set (the load's own seed is --seed).
    #[arg(long = "data-seed", id = "data_seed", default_value_t = 1)]
    pub seed: u64,
    /// HDSearch: feature vectors, their dimension and clusters.
    #[arg(long, default_value_t = 20_000)]
    pub vectors: usize,
    #[arg(long, default_value_t = 64)]
    pub dim: usize,
    #[arg(long, default_value_t = 50)]
    pub clusters: usize,
    /// Set Algebra: documents, vocabulary, terms per document.
    #[arg(long, default_value_t = 20_000)]
    pub docs: usize,
    #[arg(long, default_value_t = 5_000)]
    pub vocabulary: usize,
    #[arg(long, default_value_t = 20)]
    pub terms_per_doc: usize,
    /// Recommend: users, items, rating density, model rank.
    #[arg(long, default_value_t = 2_000)]
    pub users: usize,
    #[arg(long, default_value_t = 2_000)]
    pub items: usize,
    #[arg(long, default_value_t = 0.02)]
    pub density: f64,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
}

impl Default for DataArgs {
    fn default() -> Self {
        DataArgs {
            seed: 1,
            vectors: 20_000,
            dim: 64,
            clusters: 50,
            docs: 20_000,
            vocabulary: 5_000,
            terms_per_doc: 20,
            users: 2_000,
            items: 2_000,
            density: 0.02,
            rank: 16,
        }
    }
}

impl DataArgs {
    /// The same flags as command-line arguments, for starting other tiers.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--data-seed", self.seed.to_string()),
            ("--vectors", self.vectors.to_string()),
            ("--dim", self.dim.to_string()),
            ("--clusters", self.clusters.to_string()),
            ("--docs", self.docs.to_string()),
            ("--vocabulary", self.vocabulary.to_string()),
            ("--terms-per-doc", self.terms_per_doc.to_string()),
            ("--users", self.users.to_string()),
            ("--items", self.items.to_string()),
            ("--density", self.density.to_string()),
            ("--rank", self.rank.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

/// Serves `router` on `listener` until `shutdown` completes, with TCP_NODELAY on every
/// accepted connection.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TierError> {
    let incoming = TcpIncoming::from_listener(listener, true, None).map_err(TierError::Incoming)?;
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Lazy channels to the buckets, in shard order (the client's channel to the mid-tier too).
pub fn bucket_channels(buckets: &[SocketAddr]) -> Vec<Channel> {
    buckets
        .iter()
        .map(|a| {
            Endpoint::from_shared(format!("http://{a}"))
                .expect("an IP:PORT makes a URI")
                .connect_timeout(Duration::from_secs(30))
                .tcp_nodelay(true)
                .connect_lazy()
        })
        .collect()
}

/// Calls `f` once more if the first attempt failed in this side's transport rather than in the
/// bucket: the bucket unreachable, or the connection closed or reset under the call. A tier
/// restored from a snapshot comes back with its connections closed (`--tcp-close`), and a call
/// can be queued on one before the channel has seen it close (hyper then cancels it unsent).
/// For reads only: the failed attempt may have reached the bucket (see [`with_retry_unsent`]).
pub async fn with_retry<T, F, Fut>(f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    retry_once_if(failed_in_transport, f).await
}

/// Calls `f` once more only if the first attempt never left this side: the bucket refused
/// the connection, or the call was cancelled on a connection that closed before it was sent.
/// For writes, which a second delivery could apply over a newer one.
pub async fn with_retry_unsent<T, F, Fut>(f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    retry_once_if(never_sent, f).await
}

async fn retry_once_if<T, F, Fut>(
    again: fn(&tonic::Status) -> bool,
    mut f: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    match f().await {
        Err(s) if again(&s) => f().await,
        other => other,
    }
}

/// A status the channel made from its own connection's failure; a bucket's answer (even an
/// error) comes back without a source.
pub fn failed_in_transport(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable || made_by_channel(s)
}

/// A failure before the request left: tonic maps a refused connection to Unavailable and a
/// request hyper dropped unsent (its connection closed first) to Cancelled.
fn never_sent(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        || (s.code() == tonic::Code::Cancelled && made_by_channel(s))
}

fn made_by_channel(s: &tonic::Status) -> bool {
    s.source()
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some())
}

/// A stable 64-bit FNV-1a hash (keys must route the same in every process).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
