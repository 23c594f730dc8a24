//! HDSearch: k-nearest-neighbour search over image feature vectors. The mid-tier's LSH index
//! picks candidates and sends each bucket those in its shard; buckets rank them by distance; the
//! mid-tier merges the buckets' top k.

use std::sync::Arc;

use futures::future::try_join_all;
use tonic::{transport::Channel, Request, Response, Status};

use crate::{
    data::{shard_of, squared_distance, top_n, Lsh, Vectors},
    proto::{
        hd_search_bucket_client::HdSearchBucketClient,
        hd_search_bucket_server::{HdSearchBucket, HdSearchBucketServer},
        hd_search_server::{HdSearch, HdSearchServer},
        BucketSearch, Neighbor, SearchReply, SearchRequest,
    },
    tier::{bucket_channels, with_retry, DataArgs},
};

/// Largest k a query may ask for.
pub const MAX_K: u32 = 1000;

pub fn vectors(d: &DataArgs) -> Vectors {
    Vectors::generate(d.vectors, d.dim, d.clusters, d.seed)
}

pub fn lsh(v: &Vectors, d: &DataArgs) -> Lsh {
    Lsh::build(v, 8, 12, d.seed)
}

fn neighbors(ranked: Vec<(u64, f32)>) -> SearchReply {
    SearchReply {
        neighbors: ranked
            .into_iter()
            .map(|(id, distance)| Neighbor { id, distance })
            .collect(),
    }
}

fn check(query: &[f32], k: u32, dim: usize) -> Result<(), Status> {
    if query.len() != dim {
        return Err(Status::invalid_argument(format!(
            "query has {} values, the vectors have {dim}",
            query.len()
        )));
    }
    if k == 0 || k > MAX_K {
        return Err(Status::invalid_argument(format!("k must be 1..={MAX_K}")));
    }
    Ok(())
}

/// One bucket: its shard of the vectors.
#[derive(Debug)]
pub struct Bucket {
    vectors: Arc<Vectors>,
    shard: usize,
    shards: usize,
}

impl Bucket {
    pub fn new(d: &DataArgs, shard: usize, shards: usize) -> HdSearchBucketServer<Bucket> {
        HdSearchBucketServer::new(Bucket {
            vectors: Arc::new(vectors(d)),
            shard,
            shards,
        })
    }
}

#[tonic::async_trait]
impl HdSearchBucket for Bucket {
    async fn nearest(&self, req: Request<BucketSearch>) -> Result<Response<SearchReply>, Status> {
        let r = req.into_inner();
        check(&r.query, r.k, self.vectors.dim)?;
        let mut scored = Vec::with_capacity(r.candidates.len());
        for id in r.candidates {
            if shard_of(id, self.shards) != self.shard {
                return Err(Status::invalid_argument(format!(
                    "vector {id} is not in shard {}",
                    self.shard
                )));
            }
            let p = self
                .vectors
                .points
                .get(id as usize)
                .ok_or_else(|| Status::not_found(format!("no vector {id}")))?;
            scored.push((id, squared_distance(&r.query, p)));
        }
        Ok(Response::new(neighbors(top_n(scored, r.k as usize, true))))
    }
}

/// The mid-tier: LSH index over all vectors, fan-out, merge.
#[derive(Debug)]
pub struct Mid {
    dim: usize,
    lsh: Arc<Lsh>,
    buckets: Vec<Channel>,
}

impl Mid {
    pub fn new(d: &DataArgs, buckets: &[std::net::SocketAddr]) -> HdSearchServer<Mid> {
        let v = vectors(d);
        HdSearchServer::new(Mid {
            dim: v.dim,
            lsh: Arc::new(lsh(&v, d)),
            buckets: bucket_channels(buckets),
        })
    }
}

#[tonic::async_trait]
impl HdSearch for Mid {
    async fn search(&self, req: Request<SearchRequest>) -> Result<Response<SearchReply>, Status> {
        let r = req.into_inner();
        check(&r.query, r.k, self.dim)?;
        let shards = self.buckets.len();
        let mut per_shard = vec![Vec::new(); shards];
        for id in self.lsh.candidates(&r.query) {
            per_shard[shard_of(id, shards)].push(id);
        }
        let calls = self
            .buckets
            .iter()
            .zip(per_shard)
            .filter(|(_, c)| !c.is_empty())
            .map(|(ch, candidates)| {
                let req = BucketSearch {
                    query: r.query.clone(),
                    k: r.k,
                    candidates,
                };
                let ch = ch.clone();
                async move {
                    with_retry(|| {
                        let (mut client, req) =
                            (HdSearchBucketClient::new(ch.clone()), req.clone());
                        async move { client.nearest(req).await.map(Response::into_inner) }
                    })
                    .await
                }
            });
        let replies = try_join_all(calls).await?;
        let all = replies
            .into_iter()
            .flat_map(|r| r.neighbors)
            .map(|n| (n.id, n.distance))
            .collect();
        Ok(Response::new(neighbors(top_n(all, r.k as usize, true))))
    }
}

/// Brute force over `among` (or every vector): the answer the tiers must give.
pub fn reference(
    v: &Vectors,
    query: &[f32],
    k: usize,
    among: Option<&std::collections::BTreeSet<u64>>,
) -> Vec<(u64, f32)> {
    let scored = v
        .points
        .iter()
        .enumerate()
        .map(|(id, p)| (id as u64, squared_distance(query, p)))
        .filter(|(id, _)| match among {
            Some(a) => a.contains(id),
            None => true,
        })
        .collect();
    top_n(scored, k, true)
}
