//! µSuite behind torpor: every tier of the four services runs as its own service under
//! `torpor up`, each behind its gate (the mid-tier reaches its buckets through their gates). Each
//! service answers correctly when every tier is asleep and again when awake, checked against
//! brute force.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use torpor_testkit::{config, own_addr, Config, Up};
use torpor_usuite::{
    data::term_name,
    hdsearch,
    memcached::MemcachedServer,
    proto, recommend, setalgebra,
    tier::{bucket_channels, DataArgs},
    Service,
};

fn data() -> DataArgs {
    DataArgs {
        vectors: 2000,
        dim: 16,
        clusters: 10,
        docs: 2000,
        vocabulary: 300,
        terms_per_doc: 12,
        users: 200,
        items: 300,
        density: 0.05,
        rank: 8,
        ..DataArgs::default()
    }
}

/// The gate address of a service's mid-tier.
struct Deployed {
    service: Service,
    mid_gate: SocketAddr,
    tiers: Vec<String>,
}

/// torpor.toml services for the three tiers of `service` (two buckets).
fn tiers(
    service: Service,
    d: &DataArgs,
    memcached: &[SocketAddr],
) -> (Vec<config::Service>, Deployed) {
    let name = service.as_str();
    let data = d.to_args();
    let mut services = Vec::new();
    let mut bucket_gates = Vec::new();
    let mut names = Vec::new();
    // `usuite NAME TIER --listen BACKEND`, then `more`, then the data's arguments.
    let tier_argv = |tier: &str, backend: SocketAddr, more: Vec<String>| -> Vec<String> {
        let mut argv: Vec<String> = ["usuite", name, tier, "--listen"]
            .map(String::from)
            .to_vec();
        argv.push(backend.to_string());
        argv.extend(more);
        argv.extend(data.iter().cloned());
        argv
    };
    for shard in 0..2 {
        let (gate, backend) = (own_addr(), own_addr());
        bucket_gates.push(format!("{gate}"));
        let mut more = vec![
            "--shard".into(),
            shard.to_string(),
            "--shards".into(),
            "2".into(),
        ];
        if let (Service::Router, Some(m)) = (service, memcached.get(shard)) {
            more.extend(["--memcached".into(), m.to_string()]);
        }
        let bucket = format!("{name}-b{shard}");
        let argv = tier_argv("bucket", backend, more);
        services.push(config::Service::torpor(&bucket, &argv, gate, backend).idle("300ms"));
        names.push(bucket);
    }
    let (gate, backend) = (own_addr(), own_addr());
    let mid = format!("{name}-mid");
    let argv = tier_argv(
        "mid",
        backend,
        vec!["--buckets".into(), bucket_gates.join(",")],
    );
    services.push(config::Service::torpor(&mid, &argv, gate, backend).idle("300ms"));
    names.push(mid);
    (
        services,
        Deployed {
            service,
            mid_gate: gate,
            tiers: names,
        },
    )
}

/// Waits until every service in `names` is in `state`, whatever `up` answers meanwhile.
fn wait_all(up: &Up, names: &[String], state: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let states: Vec<(String, String)> = up
            .services()
            .unwrap_or_default()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or("").to_string(),
                    s["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let all = names
            .iter()
            .all(|n| states.iter().any(|(m, s)| m == n && s == state));
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not all {state}: {states:?}\n{}", up.log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One query per service, its answer checked against brute force.
async fn check_answer(dep: &Deployed, d: &DataArgs) -> Result<()> {
    let ch = bucket_channels(&[dep.mid_gate]).remove(0);
    match dep.service {
        Service::Hdsearch => {
            let v = hdsearch::vectors(d);
            let query = v.points[123].clone();
            let got = proto::hd_search_client::HdSearchClient::new(ch)
                .search(proto::SearchRequest {
                    query: query.clone(),
                    k: 5,
                })
                .await?
                .into_inner();
            let candidates = hdsearch::lsh(&v, d).candidates(&query);
            let want: Vec<u64> = hdsearch::reference(&v, &query, 5, Some(&candidates))
                .iter()
                .map(|x| x.0)
                .collect();
            let got: Vec<u64> = got.neighbors.iter().map(|n| n.id).collect();
            anyhow::ensure!(got == want, "hdsearch: {got:?} vs {want:?}");
            anyhow::ensure!(got[0] == 123, "the point itself is its nearest neighbour");
        }
        Service::Setalgebra => {
            let corpus = setalgebra::corpus(d);
            let terms = [0u32, 1];
            let got = proto::set_algebra_client::SetAlgebraClient::new(ch)
                .intersect(proto::IntersectRequest {
                    terms: terms.iter().map(|t| term_name(*t)).collect(),
                })
                .await?
                .into_inner()
                .docs;
            let want = setalgebra::reference(&corpus, &terms);
            anyhow::ensure!(
                !want.is_empty() && got == want,
                "setalgebra: {} vs {} docs",
                got.len(),
                want.len()
            );
        }
        Service::Recommend => {
            let model = recommend::ratings(d);
            let got = proto::recommend_client::RecommendClient::new(ch)
                .top_n(proto::RecommendRequest { user: 42, n: 5 })
                .await?
                .into_inner();
            let got: Vec<u64> = got.items.iter().map(|s| s.item).collect();
            let want: Vec<u64> = recommend::best_items(&model, 42, 5, |_| true)
                .iter()
                .map(|x| x.0)
                .collect();
            anyhow::ensure!(got == want, "recommend: {got:?} vs {want:?}");
        }
        Service::Router => {
            let mut c = proto::key_value_client::KeyValueClient::new(ch);
            let key = format!(
                "k{}",
                Instant::now().elapsed().as_nanos() ^ std::process::id() as u128
            );
            let stored = c
                .set(proto::SetRequest {
                    key: key.clone(),
                    value: b"torpor".to_vec(),
                })
                .await?
                .into_inner();
            anyhow::ensure!(stored.replicas == 2, "replicated: {stored:?}");
            let got = c.get(proto::GetRequest { key }).await?.into_inner();
            anyhow::ensure!(got.found && got.value == b"torpor", "router get: {got:?}");
        }
    }
    Ok(())
}

#[test]
fn every_usuite_service_answers_through_the_gates_asleep_and_awake() -> Result<()> {
    let d = data();
    let caches = [MemcachedServer::start(16)?, MemcachedServer::start(16)?];
    let memcached: Vec<SocketAddr> = caches.iter().map(|c| c.addr).collect();
    let mut services = Vec::new();
    let mut deployed = Vec::new();
    for s in Service::ALL {
        let (tier_services, dep) = tiers(s, &d, &memcached);
        services.extend(tier_services);
        deployed.push(dep);
    }
    let up = Up::spawn(
        &Config::embedded("1GiB")
            .status(own_addr())
            .services(services),
    )?;
    let all: Vec<String> = deployed.iter().flat_map(|d| d.tiers.clone()).collect();
    let rt = tokio::runtime::Runtime::new()?;
    wait_all(&up, &all, "asleep", Duration::from_secs(120))?;
    for dep in &deployed {
        // Every tier asleep: the query wakes the mid-tier, which wakes its buckets.
        rt.block_on(check_answer(dep, &d))
            .with_context(|| format!("{} while asleep", dep.service.as_str()))?;
        wait_all(&up, &dep.tiers, "awake", Duration::from_secs(5))?;
        rt.block_on(check_answer(dep, &d))
            .with_context(|| format!("{} while awake", dep.service.as_str()))?;
    }
    // And once more after they all fell asleep again.
    wait_all(&up, &all, "asleep", Duration::from_secs(60))?;
    for dep in &deployed {
        rt.block_on(check_answer(dep, &d))
            .with_context(|| format!("{} after a second sleep", dep.service.as_str()))?;
    }
    Ok(())
}
