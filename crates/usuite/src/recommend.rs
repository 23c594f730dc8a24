//! Recommend: collaborative filtering with a matrix factorization model. Items are sharded over
//! the buckets; each predicts the user's rating of its items not yet rated and returns its top n;
//! the mid-tier merges.

use std::{net::SocketAddr, sync::Arc};

use futures::future::try_join_all;
use tonic::{transport::Channel, Request, Response, Status};

use crate::{
    data::{shard_of, top_n, Ratings},
    proto::{
        recommend_client::RecommendClient,
        recommend_server::{Recommend, RecommendServer},
        RecommendReply, RecommendRequest, Scored,
    },
    tier::{bucket_channels, with_retry, DataArgs},
};

/// Most items one answer may hold.
pub const MAX_N: u32 = 1000;

pub fn ratings(d: &DataArgs) -> Ratings {
    Ratings::generate(d.users, d.items, d.density, d.rank, d.seed)
}

fn reply(ranked: Vec<(u64, f32)>) -> RecommendReply {
    RecommendReply {
        items: ranked
            .into_iter()
            .map(|(item, score)| Scored { item, score })
            .collect(),
    }
}

fn check(r: &RecommendRequest, users: usize) -> Result<(), Status> {
    if r.user as usize >= users {
        return Err(Status::not_found(format!(
            "no user {} (there are {users})",
            r.user
        )));
    }
    if r.n == 0 || r.n > MAX_N {
        return Err(Status::invalid_argument(format!("n must be 1..={MAX_N}")));
    }
    Ok(())
}

/// One bucket: the model, predicting for its items.
#[derive(Debug)]
pub struct Bucket {
    model: Arc<Ratings>,
    shard: usize,
    shards: usize,
}

impl Bucket {
    pub fn new(d: &DataArgs, shard: usize, shards: usize) -> RecommendServer<Bucket> {
        RecommendServer::new(Bucket {
            model: Arc::new(ratings(d)),
            shard,
            shards,
        })
    }
}

/// The best `n` unrated items of `user` among those `keep` selects.
pub fn best_items(
    m: &Ratings,
    user: usize,
    n: usize,
    keep: impl Fn(u64) -> bool,
) -> Vec<(u64, f32)> {
    let scored = (0..m.items as u64)
        .filter(|i| keep(*i) && !m.rated[user].contains(&(*i as u32)))
        .map(|i| (i, m.predict(user, i as usize)))
        .collect();
    top_n(scored, n, false)
}

#[tonic::async_trait]
impl Recommend for Bucket {
    async fn top_n(
        &self,
        req: Request<RecommendRequest>,
    ) -> Result<Response<RecommendReply>, Status> {
        let r = req.into_inner();
        check(&r, self.model.users)?;
        let (shard, shards) = (self.shard, self.shards);
        Ok(Response::new(reply(best_items(
            &self.model,
            r.user as usize,
            r.n as usize,
            |i| shard_of(i, shards) == shard,
        ))))
    }
}

/// The mid-tier: fan-out and merge.
#[derive(Debug)]
pub struct Mid {
    users: usize,
    buckets: Vec<Channel>,
}

impl Mid {
    pub fn new(d: &DataArgs, buckets: &[SocketAddr]) -> RecommendServer<Mid> {
        RecommendServer::new(Mid {
            users: d.users,
            buckets: bucket_channels(buckets),
        })
    }
}

#[tonic::async_trait]
impl Recommend for Mid {
    async fn top_n(
        &self,
        req: Request<RecommendRequest>,
    ) -> Result<Response<RecommendReply>, Status> {
        let r = req.into_inner();
        check(&r, self.users)?;
        let calls = self.buckets.iter().map(|ch| {
            let ch = ch.clone();
            async move {
                with_retry(|| {
                    let mut c = RecommendClient::new(ch.clone());
                    async move { c.top_n(r).await.map(Response::into_inner) }
                })
                .await
            }
        });
        let all = try_join_all(calls)
            .await?
            .into_iter()
            .flat_map(|x| x.items)
            .map(|s| (s.item, s.score))
            .collect();
        Ok(Response::new(reply(top_n(all, r.n as usize, false))))
    }
}
