//! Router: get/set routed by a hash of the key to a bucket and its replicas; each bucket fronts
//! a real memcached. Sets go to every replica; gets go to the primary and fall over to the next
//! replica if it is unreachable.

use std::net::SocketAddr;

use futures::future::join_all;
use tonic::{transport::Channel, Request, Response, Status};

use crate::{
    memcached::{valid_key, Memcached, MemcachedError, MAX_VALUE},
    proto::{
        key_value_client::KeyValueClient,
        key_value_server::{KeyValue, KeyValueServer},
        GetReply, GetRequest, SetReply, SetRequest,
    },
    tier::{bucket_channels, failed_in_transport, fnv1a, with_retry, with_retry_unsent},
};

fn check(key: &str) -> Result<(), Status> {
    if valid_key(key) {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            MemcachedError::BadKey(key.into()).to_string(),
        ))
    }
}

/// A memcached failure as gRPC UNAVAILABLE, with its causes.
fn unavailable(e: MemcachedError) -> Status {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    Status::unavailable(text)
}

/// One bucket in front of its memcached.
#[derive(Debug)]
pub struct Bucket {
    memcached: Memcached,
}

impl Bucket {
    pub fn new(memcached: SocketAddr) -> KeyValueServer<Bucket> {
        KeyValueServer::new(Bucket {
            memcached: Memcached::new(memcached),
        })
    }
}

#[tonic::async_trait]
impl KeyValue for Bucket {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetReply>, Status> {
        let key = req.into_inner().key;
        check(&key)?;
        let value = self.memcached.get(&key).await.map_err(unavailable)?;
        Ok(Response::new(GetReply {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn set(&self, req: Request<SetRequest>) -> Result<Response<SetReply>, Status> {
        let r = req.into_inner();
        check(&r.key)?;
        if r.value.len() > MAX_VALUE {
            return Err(Status::invalid_argument(format!(
                "value over {MAX_VALUE} bytes"
            )));
        }
        self.memcached
            .set(&r.key, &r.value)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(SetReply { replicas: 1 }))
    }
}

/// The buckets a key lives on: its primary first.
pub fn replicas_of(key: &str, buckets: usize, replicas: usize) -> Vec<usize> {
    let primary = (fnv1a(key.as_bytes()) % buckets as u64) as usize;
    (0..replicas.clamp(1, buckets))
        .map(|i| (primary + i) % buckets)
        .collect()
}

/// The mid-tier: routes and replicates.
#[derive(Debug)]
pub struct Mid {
    buckets: Vec<Channel>,
    replicas: usize,
}

impl Mid {
    pub fn new(buckets: &[SocketAddr], replicas: usize) -> KeyValueServer<Mid> {
        KeyValueServer::new(Mid {
            buckets: bucket_channels(buckets),
            replicas,
        })
    }
}

#[tonic::async_trait]
impl KeyValue for Mid {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetReply>, Status> {
        let r = req.into_inner();
        check(&r.key)?;
        let mut last = Status::unavailable("no bucket");
        for b in replicas_of(&r.key, self.buckets.len(), self.replicas) {
            let ch = self.buckets[b].clone();
            let got = with_retry(|| {
                let (mut c, r) = (KeyValueClient::new(ch.clone()), r.clone());
                async move { c.get(r).await.map(Response::into_inner) }
            })
            .await;
            match got {
                Ok(reply) => return Ok(Response::new(reply)),
                // The next replica, as when this one is down.
                Err(s) if failed_in_transport(&s) => last = s,
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }

    async fn set(&self, req: Request<SetRequest>) -> Result<Response<SetReply>, Status> {
        let r = req.into_inner();
        check(&r.key)?;
        let calls = replicas_of(&r.key, self.buckets.len(), self.replicas)
            .into_iter()
            .map(|b| {
                let (ch, r) = (self.buckets[b].clone(), r.clone());
                async move {
                    with_retry_unsent(|| {
                        let (mut c, r) = (KeyValueClient::new(ch.clone()), r.clone());
                        async move { c.set(r).await.map(Response::into_inner) }
                    })
                    .await
                }
            });
        let results = join_all(calls).await;
        let stored = results.iter().filter(|r| r.is_ok()).count() as u32;
        if stored == 0 {
            let why = results
                .into_iter()
                .find_map(Result::err)
                .map_or_else(String::new, |s| s.message().to_string());
            return Err(Status::unavailable(format!(
                "no replica stored the key: {why}"
            )));
        }
        Ok(Response::new(SetReply { replicas: stored }))
    }
}
