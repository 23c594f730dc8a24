//! Seeded data sets, generated the same in every process from the same flags: clustered feature
//! vectors (HDSearch), a Zipfian corpus (Set Algebra) and a sparse rating matrix with its matrix
//! factorization model (Recommend). Router needs none: its keys are Zipfian in the client.

use std::collections::{BTreeMap, BTreeSet};

use rand::{rngs::SmallRng, Rng, SeedableRng};

/// Which shard of `shards` owns `id`.
pub fn shard_of(id: u64, shards: usize) -> usize {
    (id % shards as u64) as usize
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut SmallRng) -> f32 {
    let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Zipf(s) over 0..n by inverse transform on a precomputed CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut SmallRng) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// HDSearch's image feature vectors: `n` points of `dim` floats around `clusters` centres.
#[derive(Debug, Clone)]
pub struct Vectors {
    pub dim: usize,
    pub points: Vec<Vec<f32>>,
    centres: Vec<Vec<f32>>,
}

impl Vectors {
    pub fn generate(n: usize, dim: usize, clusters: usize, seed: u64) -> Vectors {
        let mut rng = SmallRng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..clusters.max(1))
            .map(|_| (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let points = (0..n)
            .map(|_| {
                let c = &centres[rng.gen_range(0..centres.len())];
                c.iter().map(|x| x + 0.1 * normal(&mut rng)).collect()
            })
            .collect();
        Vectors {
            dim,
            points,
            centres,
        }
    }

    /// A query near the data: a random centre plus noise.
    pub fn query(&self, rng: &mut SmallRng) -> Vec<f32> {
        let c = &self.centres[rng.gen_range(0..self.centres.len())];
        c.iter().map(|x| x + 0.1 * normal(rng)).collect()
    }
}

pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Random-hyperplane LSH: `tables` hash tables of `bits` sign bits each.
#[derive(Debug, Clone)]
pub struct Lsh {
    planes: Vec<Vec<Vec<f32>>>,
    tables: Vec<BTreeMap<u64, Vec<u64>>>,
}

impl Lsh {
    pub fn build(vectors: &Vectors, tables: usize, bits: usize, seed: u64) -> Lsh {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x15b);
        let planes: Vec<Vec<Vec<f32>>> = (0..tables)
            .map(|_| {
                (0..bits)
                    .map(|_| (0..vectors.dim).map(|_| normal(&mut rng)).collect())
                    .collect()
            })
            .collect();
        let mut lsh = Lsh {
            planes,
            tables: vec![BTreeMap::new(); tables],
        };
        for (id, p) in vectors.points.iter().enumerate() {
            for t in 0..tables {
                let h = lsh.hash(t, p);
                lsh.tables[t].entry(h).or_default().push(id as u64);
            }
        }
        lsh
    }

    fn hash(&self, table: usize, v: &[f32]) -> u64 {
        self.planes[table]
            .iter()
            .enumerate()
            .fold(0u64, |h, (i, plane)| {
                let dot: f32 = plane.iter().zip(v).map(|(a, b)| a * b).sum();
                h | (u64::from(dot >= 0.0) << i)
            })
    }

    /// Ids sharing a bucket with `query` in any table.
    pub fn candidates(&self, query: &[f32]) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for t in 0..self.tables.len() {
            if let Some(ids) = self.tables[t].get(&self.hash(t, query)) {
                out.extend(ids);
            }
        }
        out
    }
}

/// Set Algebra's corpus: `docs` documents of `terms_per_doc` Zipfian terms from `vocabulary`.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub docs: Vec<Vec<u32>>,
    pub vocabulary: usize,
}

impl Corpus {
    pub fn generate(docs: usize, vocabulary: usize, terms_per_doc: usize, seed: u64) -> Corpus {
        let mut rng = SmallRng::seed_from_u64(seed);
        let zipf = Zipf::new(vocabulary, 1.0);
        let docs = (0..docs)
            .map(|_| {
                let mut terms: Vec<u32> = (0..terms_per_doc)
                    .map(|_| zipf.sample(&mut rng) as u32)
                    .collect();
                terms.sort_unstable();
                terms.dedup();
                terms
            })
            .collect();
        Corpus { docs, vocabulary }
    }

    /// Posting lists (term → sorted doc ids) of the docs in `shard` of `shards`.
    pub fn postings(&self, shard: usize, shards: usize) -> BTreeMap<u32, Vec<u64>> {
        let mut out: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (id, terms) in self.docs.iter().enumerate() {
            if shard_of(id as u64, shards) == shard {
                for t in terms {
                    out.entry(*t).or_default().push(id as u64);
                }
            }
        }
        out
    }
}

/// Term names on the wire.
pub fn term_name(t: u32) -> String {
    format!("t{t}")
}

pub fn term_id(name: &str) -> Option<u32> {
    name.strip_prefix('t')?.parse().ok()
}

/// Recommend's ratings and the matrix factorization model trained on them.
#[derive(Debug, Clone)]
pub struct Ratings {
    pub users: usize,
    pub items: usize,
    /// (user, item, rating 1-5).
    pub ratings: Vec<(u32, u32, f32)>,
    /// Learnt user and item factors.
    pub user_factors: Vec<Vec<f32>>,
    pub item_factors: Vec<Vec<f32>>,
    /// Items each user rated (not recommended again).
    pub rated: Vec<BTreeSet<u32>>,
}

impl Ratings {
    /// Ratings drawn from hidden `rank`-dimensional tastes plus noise, then a model fitted to
    /// them by stochastic gradient descent (fixed order and seed: every process gets the same).
    pub fn generate(users: usize, items: usize, density: f64, rank: usize, seed: u64) -> Ratings {
        let mut rng = SmallRng::seed_from_u64(seed);
        let hidden_u: Vec<Vec<f32>> = (0..users)
            .map(|_| (0..rank).map(|_| normal(&mut rng)).collect())
            .collect();
        let hidden_i: Vec<Vec<f32>> = (0..items)
            .map(|_| (0..rank).map(|_| normal(&mut rng)).collect())
            .collect();
        let mut ratings = Vec::new();
        let mut rated = vec![BTreeSet::new(); users];
        for (u, hu) in hidden_u.iter().enumerate() {
            for (i, hi) in hidden_i.iter().enumerate() {
                if rng.gen::<f64>() < density {
                    let taste: f32 = hu.iter().zip(hi).map(|(a, b)| a * b).sum();
                    let r = (3.0 + taste / (rank as f32).sqrt() * 1.5 + 0.3 * normal(&mut rng))
                        .round()
                        .clamp(1.0, 5.0);
                    ratings.push((u as u32, i as u32, r));
                    rated[u].insert(i as u32);
                }
            }
        }
        let mut user_factors: Vec<Vec<f32>> = (0..users)
            .map(|_| (0..rank).map(|_| 0.1 * normal(&mut rng)).collect())
            .collect();
        let mut item_factors: Vec<Vec<f32>> = (0..items)
            .map(|_| (0..rank).map(|_| 0.1 * normal(&mut rng)).collect())
            .collect();
        let (lr, reg) = (0.02f32, 0.02f32);
        for _ in 0..30 {
            for &(u, i, r) in &ratings {
                let (pu, qi) = (&mut user_factors[u as usize], &mut item_factors[i as usize]);
                let err = r - pu.iter().zip(qi.iter()).map(|(a, b)| a * b).sum::<f32>();
                for k in 0..rank {
                    let (a, b) = (pu[k], qi[k]);
                    pu[k] += lr * (err * b - reg * a);
                    qi[k] += lr * (err * a - reg * b);
                }
            }
        }
        Ratings {
            users,
            items,
            ratings,
            user_factors,
            item_factors,
            rated,
        }
    }

    pub fn predict(&self, user: usize, item: usize) -> f32 {
        self.user_factors[user]
            .iter()
            .zip(&self.item_factors[item])
            .map(|(a, b)| a * b)
            .sum()
    }

    /// Root mean square error of the model on its ratings.
    pub fn rmse(&self) -> f32 {
        let se: f32 = self
            .ratings
            .iter()
            .map(|&(u, i, r)| (r - self.predict(u as usize, i as usize)).powi(2))
            .sum();
        (se / self.ratings.len().max(1) as f32).sqrt()
    }
}

/// Best `n` of (id, score) by descending score, ties by ascending id: one order for every tier.
pub fn top_n(mut scored: Vec<(u64, f32)>, n: usize, ascending: bool) -> Vec<(u64, f32)> {
    scored.sort_by(|a, b| {
        let by_score = if ascending {
            a.1.total_cmp(&b.1)
        } else {
            b.1.total_cmp(&a.1)
        };
        by_score.then(a.0.cmp(&b.0))
    });
    scored.truncate(n);
    scored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_data() {
        assert_eq!(
            Vectors::generate(100, 8, 4, 1).points,
            Vectors::generate(100, 8, 4, 1).points
        );
        assert_eq!(
            Corpus::generate(100, 50, 10, 1).docs,
            Corpus::generate(100, 50, 10, 1).docs
        );
        assert_eq!(
            Ratings::generate(50, 40, 0.1, 4, 1).item_factors,
            Ratings::generate(50, 40, 0.1, 4, 1).item_factors
        );
    }

    #[test]
    fn zipf_favours_low_ranks() {
        let z = Zipf::new(1000, 1.0);
        let mut rng = SmallRng::seed_from_u64(3);
        let draws: Vec<usize> = (0..10_000).map(|_| z.sample(&mut rng)).collect();
        let top = draws.iter().filter(|d| **d == 0).count();
        let mid = draws.iter().filter(|d| **d == 99).count();
        assert!(top > 10 * mid.max(1), "rank 1: {top}, rank 100: {mid}");
    }

    #[test]
    fn the_model_fits_its_ratings() {
        let r = Ratings::generate(300, 200, 0.05, 8, 2);
        assert!(r.rmse() < 0.9, "rmse {}", r.rmse());
    }

    #[test]
    fn lsh_finds_close_points() {
        let v = Vectors::generate(2000, 16, 10, 4);
        let lsh = Lsh::build(&v, 8, 10, 4);
        let c = lsh.candidates(&v.points[17]);
        assert!(c.contains(&17) && c.len() < 2000);
    }
}
