//! µSuite's client tier: a load-generator target per service that draws each request from the
//! service's data set (query vectors near the data, Zipfian keys and terms, random users), seeded
//! by the request number so a run is reproducible.

use std::net::SocketAddr;

use async_trait::async_trait;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tonic::transport::Channel;
use torpor_loadgen::Target;

use crate::{
    data::{term_name, Vectors, Zipf},
    hdsearch,
    proto::{
        hd_search_client::HdSearchClient, key_value_client::KeyValueClient,
        recommend_client::RecommendClient, set_algebra_client::SetAlgebraClient, GetRequest,
        IntersectRequest, RecommendRequest, SearchRequest, SetRequest,
    },
    tier::{bucket_channels, DataArgs},
    Service,
};

/// Router keys drawn from this many, Zipfian.
const ROUTER_KEYS: usize = 10_000;
/// One Router request in ten is a set.
const ROUTER_SET_SHARE: f64 = 0.1;

/// What a request of each service needs to be drawn.
#[derive(Debug)]
enum Draw {
    HdSearch(Box<Vectors>),
    Router(Zipf),
    SetAlgebra(Zipf),
    Recommend { users: usize },
}

/// A µSuite mid-tier as a load-generator target.
#[derive(Debug)]
pub struct UsuiteTarget {
    service: Service,
    mid: SocketAddr,
    channel: Channel,
    draw: Draw,
    seed: u64,
}

impl UsuiteTarget {
    pub fn new(service: Service, mid: SocketAddr, d: &DataArgs) -> UsuiteTarget {
        let draw = match service {
            Service::Hdsearch => Draw::HdSearch(Box::new(hdsearch::vectors(d))),
            Service::Router => Draw::Router(Zipf::new(ROUTER_KEYS, 0.99)),
            Service::Setalgebra => Draw::SetAlgebra(Zipf::new(d.vocabulary, 1.0)),
            Service::Recommend => Draw::Recommend { users: d.users },
        };
        UsuiteTarget {
            service,
            mid,
            channel: bucket_channels(&[mid]).remove(0),
            draw,
            seed: d.seed,
        }
    }
}

fn status(s: tonic::Status) -> String {
    format!("grpc {:?}", s.code())
}

#[async_trait]
impl Target for UsuiteTarget {
    async fn call(&self, seq: u64) -> Result<(), String> {
        let mut rng = SmallRng::seed_from_u64(self.seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let ch = self.channel.clone();
        match &self.draw {
            Draw::HdSearch(v) => {
                let query = v.query(&mut rng);
                HdSearchClient::new(ch)
                    .search(SearchRequest { query, k: 10 })
                    .await
                    .map_err(status)?;
            }
            Draw::Router(keys) => {
                let key = format!("key{}", keys.sample(&mut rng));
                let mut c = KeyValueClient::new(ch);
                if rng.gen::<f64>() < ROUTER_SET_SHARE {
                    let value = format!("value-{seq}").into_bytes();
                    c.set(SetRequest { key, value }).await.map_err(status)?;
                } else {
                    c.get(GetRequest { key }).await.map_err(status)?;
                }
            }
            Draw::SetAlgebra(terms) => {
                let terms = (0..rng.gen_range(1..=3))
                    .map(|_| term_name(terms.sample(&mut rng) as u32))
                    .collect();
                SetAlgebraClient::new(ch)
                    .intersect(IntersectRequest { terms })
                    .await
                    .map_err(status)?;
            }
            Draw::Recommend { users } => {
                let user = rng.gen_range(0..*users as u64);
                RecommendClient::new(ch)
                    .top_n(RecommendRequest { user, n: 10 })
                    .await
                    .map_err(status)?;
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("usuite {} mid-tier at {}", self.service.as_str(), self.mid)
    }
}
