//! Set Algebra: the documents holding every term of a query. Documents are sharded over the
//! buckets; each intersects its posting lists, the mid-tier takes the union.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use futures::future::try_join_all;
use tonic::{transport::Channel, Request, Response, Status};

use crate::{
    data::{term_id, Corpus},
    proto::{
        set_algebra_client::SetAlgebraClient,
        set_algebra_server::{SetAlgebra, SetAlgebraServer},
        DocList, IntersectRequest,
    },
    tier::{bucket_channels, with_retry, DataArgs},
};

/// Most terms in one query.
pub const MAX_TERMS: usize = 64;

pub fn corpus(d: &DataArgs) -> Corpus {
    Corpus::generate(d.docs, d.vocabulary, d.terms_per_doc, d.seed)
}

fn terms(r: &IntersectRequest) -> Result<Vec<u32>, Status> {
    if r.terms.is_empty() || r.terms.len() > MAX_TERMS {
        return Err(Status::invalid_argument(format!(
            "give 1..={MAX_TERMS} terms"
        )));
    }
    r.terms
        .iter()
        .map(|t| {
            term_id(t)
                .ok_or_else(|| Status::invalid_argument(format!("{t:?} is not a term (t0, t1, …)")))
        })
        .collect()
}

/// Sorted-list intersection.
fn intersect(a: &[u64], b: &[u64]) -> Vec<u64> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

/// One bucket: posting lists of its shard.
#[derive(Debug)]
pub struct Bucket {
    postings: Arc<BTreeMap<u32, Vec<u64>>>,
}

impl Bucket {
    pub fn new(d: &DataArgs, shard: usize, shards: usize) -> SetAlgebraServer<Bucket> {
        SetAlgebraServer::new(Bucket {
            postings: Arc::new(corpus(d).postings(shard, shards)),
        })
    }
}

#[tonic::async_trait]
impl SetAlgebra for Bucket {
    async fn intersect(&self, req: Request<IntersectRequest>) -> Result<Response<DocList>, Status> {
        let mut terms = terms(req.get_ref())?;
        // Shortest list first keeps every step small.
        terms.sort_by_key(|t| self.postings.get(t).map_or(0, Vec::len));
        let empty = Vec::new();
        let mut docs = self.postings.get(&terms[0]).unwrap_or(&empty).clone();
        for t in &terms[1..] {
            docs = intersect(&docs, self.postings.get(t).unwrap_or(&empty));
        }
        Ok(Response::new(DocList { docs }))
    }
}

/// The mid-tier: fan-out and union.
#[derive(Debug)]
pub struct Mid {
    buckets: Vec<Channel>,
}

impl Mid {
    pub fn new(buckets: &[SocketAddr]) -> SetAlgebraServer<Mid> {
        SetAlgebraServer::new(Mid {
            buckets: bucket_channels(buckets),
        })
    }
}

#[tonic::async_trait]
impl SetAlgebra for Mid {
    async fn intersect(&self, req: Request<IntersectRequest>) -> Result<Response<DocList>, Status> {
        let r = req.into_inner();
        terms(&r)?;
        let calls = self.buckets.iter().map(|ch| {
            let (ch, r) = (ch.clone(), r.clone());
            async move {
                with_retry(|| {
                    let (mut c, r) = (SetAlgebraClient::new(ch.clone()), r.clone());
                    async move { c.intersect(r).await.map(Response::into_inner) }
                })
                .await
            }
        });
        let mut docs: Vec<u64> = try_join_all(calls)
            .await?
            .into_iter()
            .flat_map(|l| l.docs)
            .collect();
        docs.sort_unstable();
        Ok(Response::new(DocList { docs }))
    }
}

/// Brute force over every document.
pub fn reference(c: &Corpus, terms: &[u32]) -> Vec<u64> {
    c.docs
        .iter()
        .enumerate()
        .filter(|(_, d)| terms.iter().all(|t| d.binary_search(t).is_ok()))
        .map(|(id, _)| id as u64)
        .collect()
}
