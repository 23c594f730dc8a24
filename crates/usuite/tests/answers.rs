//! Every service's tiers started in-process on 127.0.0.1:0 (Router's buckets in front of real
//! memcached servers), answers checked against brute force.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
};

use rand::{rngs::SmallRng, Rng, SeedableRng};
use tokio::net::TcpListener;
use tonic::transport::{server::Router, Server};
use torpor_usuite::{
    data::Zipf,
    hdsearch,
    memcached::MemcachedServer,
    proto, recommend, router, setalgebra,
    tier::{self, DataArgs},
};

fn small() -> DataArgs {
    DataArgs {
        vectors: 3000,
        dim: 16,
        clusters: 20,
        docs: 3000,
        vocabulary: 500,
        terms_per_doc: 15,
        users: 300,
        items: 400,
        density: 0.05,
        rank: 8,
        ..DataArgs::default()
    }
}

/// Serves `router` on a fresh port until the test ends.
async fn start(router: Router) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(tier::serve(l, router, std::future::pending()));
    addr
}

fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tier::bucket_channels(&[addr]).remove(0)
}

const SHARDS: usize = 3;

#[tokio::test]
async fn hdsearch_matches_brute_force_over_the_candidates_and_recalls_the_true_neighbours() {
    let d = small();
    let mut buckets = Vec::new();
    for shard in 0..SHARDS {
        buckets.push(
            start(Server::builder().add_service(hdsearch::Bucket::new(&d, shard, SHARDS))).await,
        );
    }
    let mid = start(Server::builder().add_service(hdsearch::Mid::new(&d, &buckets))).await;
    let mut client = proto::hd_search_client::HdSearchClient::new(channel(mid));
    let vectors = hdsearch::vectors(&d);
    let lsh = hdsearch::lsh(&vectors, &d);
    let mut rng = SmallRng::seed_from_u64(9);
    let (mut hits, mut wanted) = (0, 0);
    for _ in 0..30 {
        let query = vectors.query(&mut rng);
        let got = client
            .search(proto::SearchRequest {
                query: query.clone(),
                k: 10,
            })
            .await
            .unwrap()
            .into_inner();
        let got: Vec<u64> = got.neighbors.iter().map(|n| n.id).collect();
        let candidates = lsh.candidates(&query);
        let want: Vec<u64> = hdsearch::reference(&vectors, &query, 10, Some(&candidates))
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, want, "the tiers rank exactly the LSH candidates");
        let exact: BTreeSet<u64> = hdsearch::reference(&vectors, &query, 10, None)
            .iter()
            .map(|x| x.0)
            .collect();
        hits += got.iter().filter(|id| exact.contains(id)).count();
        wanted += exact.len();
    }
    let recall = hits as f64 / wanted as f64;
    assert!(
        recall >= 0.8,
        "recall@10 against exhaustive search: {recall}"
    );
    let bad = client
        .search(proto::SearchRequest {
            query: vec![0.0; 3],
            k: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn set_algebra_matches_brute_force_intersection() {
    let d = small();
    let mut buckets = Vec::new();
    for shard in 0..SHARDS {
        buckets.push(
            start(Server::builder().add_service(setalgebra::Bucket::new(&d, shard, SHARDS))).await,
        );
    }
    let mid = start(Server::builder().add_service(setalgebra::Mid::new(&buckets))).await;
    let mut client = proto::set_algebra_client::SetAlgebraClient::new(channel(mid));
    let corpus = setalgebra::corpus(&d);
    let zipf = Zipf::new(d.vocabulary, 1.0);
    let mut rng = SmallRng::seed_from_u64(4);
    let mut nonempty = 0;
    for _ in 0..50 {
        let terms: Vec<u32> = (0..rng.gen_range(1..=3))
            .map(|_| zipf.sample(&mut rng) as u32)
            .collect();
        let names = terms
            .iter()
            .map(|t| torpor_usuite::data::term_name(*t))
            .collect();
        let got = client
            .intersect(proto::IntersectRequest { terms: names })
            .await
            .unwrap()
            .into_inner()
            .docs;
        let want = setalgebra::reference(&corpus, &terms);
        nonempty += usize::from(!want.is_empty());
        assert_eq!(got, want, "terms {terms:?}");
    }
    assert!(nonempty > 10, "the queries exercise real intersections");
    let bad = client
        .intersect(proto::IntersectRequest {
            terms: vec!["cat".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn recommend_matches_brute_force_prediction() {
    let d = small();
    let mut buckets = Vec::new();
    for shard in 0..SHARDS {
        buckets.push(
            start(Server::builder().add_service(recommend::Bucket::new(&d, shard, SHARDS))).await,
        );
    }
    let mid = start(Server::builder().add_service(recommend::Mid::new(&d, &buckets))).await;
    let mut client = proto::recommend_client::RecommendClient::new(channel(mid));
    let model = recommend::ratings(&d);
    for user in [0u64, 7, 150, 299] {
        let got = client
            .top_n(proto::RecommendRequest { user, n: 10 })
            .await
            .unwrap()
            .into_inner();
        let got: Vec<u64> = got.items.iter().map(|s| s.item).collect();
        let want: Vec<u64> = recommend::best_items(&model, user as usize, 10, |_| true)
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(got, want, "user {user}");
        assert!(
            got.iter()
                .all(|i| !model.rated[user as usize].contains(&(*i as u32))),
            "nothing already rated"
        );
    }
    let bad = client
        .top_n(proto::RecommendRequest {
            user: 10_000,
            n: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn router_matches_a_map_and_replicates_sets_into_memcached() {
    let caches: Vec<MemcachedServer> = (0..SHARDS)
        .map(|_| MemcachedServer::start(64).unwrap())
        .collect();
    let mut buckets = Vec::new();
    for c in &caches {
        buckets.push(start(Server::builder().add_service(router::Bucket::new(c.addr))).await);
    }
    let mid = start(Server::builder().add_service(router::Mid::new(&buckets, 2))).await;
    let mut client = proto::key_value_client::KeyValueClient::new(channel(mid));
    let mut reference = HashMap::new();
    let zipf = Zipf::new(1000, 0.99);
    let mut rng = SmallRng::seed_from_u64(5);
    for i in 0..300 {
        let key = format!("key{}", zipf.sample(&mut rng));
        if i % 3 == 0 {
            let value = format!("value-{i}").into_bytes();
            let r = client
                .set(proto::SetRequest {
                    key: key.clone(),
                    value: value.clone(),
                })
                .await
                .unwrap();
            assert_eq!(r.into_inner().replicas, 2);
            reference.insert(key, value);
        } else {
            let r = client
                .get(proto::GetRequest { key: key.clone() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.found, reference.contains_key(&key), "{key}");
            if r.found {
                assert_eq!(&r.value, &reference[&key]);
            }
        }
    }
    // Each stored key sits in both of its replicas' memcached.
    let (key, value) = reference.iter().next().unwrap();
    for b in router::replicas_of(key, SHARDS, 2) {
        let m = torpor_usuite::memcached::Memcached::new(caches[b].addr);
        assert_eq!(m.get(key).await.unwrap().as_ref(), Some(value));
    }
    let bad = client
        .get(proto::GetRequest {
            key: "has space".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}
