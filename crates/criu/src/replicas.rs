//! Where a node keeps its snapshots: one pool or several replicas, and the node key that
//! seals what it commits.
//!
//! An upload goes to every replica at once and counts once `write_quorum` of them committed
//! the same generation under the same seal; a replica that fails mid-way is dropped (logged)
//! as long as the quorum can still be met. The generation is chosen by the node, one more
//! than any replica has seen, so every replica holds the snapshot under the same number and
//! the seal binds it. A restore tries the replicas in order and accepts only a snapshot whose
//! seal this node's key verifies ([`verify_manifest`]).

use std::{collections::HashMap, sync::Arc};

use torpor_image::{
    manifest::SnapshotMeta,
    seal::{FileDigest, SealedFile},
    wire::Tier,
    Manifest, NodeKey, SealError,
};
use torpor_pool::{ClientError, PoolClient};
use tracing::warn;

use crate::PoolTarget;

/// A node's snapshot stores and its key.
#[derive(Debug, Clone)]
pub struct Pools {
    /// Every replica; a restore tries them in this order.
    pub replicas: Vec<PoolTarget>,
    /// Replicas that must commit before a checkpoint counts and the service may be killed.
    pub write_quorum: usize,
    /// Seals every commit; a restore refuses what it cannot verify with it. `None` only for
    /// a pool inside this process's own trust boundary (the embedded pool of `torpor up`: same
    /// process, private socket, a token nobody else holds), where a seal would guard the
    /// agent's memory against itself at the price of hashing every byte twice per cycle.
    pub key: Option<Arc<NodeKey>>,
}

impl Pools {
    /// One pool, no replica, snapshots sealed with `key`.
    pub fn single(target: PoolTarget, key: Arc<NodeKey>) -> Pools {
        Pools {
            replicas: vec![target],
            write_quorum: 1,
            key: Some(key),
        }
    }
}

/// What a replicated commit produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub generation: u64,
    pub bytes: u64,
    /// Tier of the first replica that committed.
    pub tier: Tier,
    /// Replicas holding the snapshot.
    pub replicas: usize,
}

/// An upload to a quorum of replicas, digesting every file for the seal as it passes.
#[derive(Debug)]
pub struct ReplicatedUpload {
    name: String,
    meta: SnapshotMeta,
    key: Option<Arc<NodeKey>>,
    quorum: usize,
    /// Live connections with their replica index.
    clients: Vec<(usize, PoolClient)>,
    /// The highest "next generation" any replica announced.
    next_generation: u64,
    /// Open files by id: name and running digest.
    open: HashMap<u32, (String, FileDigest)>,
    sealed: Vec<SealedFile>,
    /// The first failure, kept to explain a lost quorum.
    first_error: Option<ClientError>,
}

impl ReplicatedUpload {
    /// Connects to every replica and starts the upload; fails when fewer than the quorum can.
    pub fn begin(
        pools: &Pools,
        name: &str,
        meta: SnapshotMeta,
    ) -> Result<ReplicatedUpload, ClientError> {
        let mut up = ReplicatedUpload {
            name: name.to_string(),
            meta: meta.clone(),
            key: pools.key.clone(),
            quorum: pools.write_quorum.clamp(1, pools.replicas.len().max(1)),
            clients: Vec::new(),
            next_generation: 1,
            open: HashMap::new(),
            sealed: Vec::new(),
            first_error: None,
        };
        for (i, target) in pools.replicas.iter().enumerate() {
            let started = target.connect().and_then(|mut c| {
                let next = c.put_begin(name, meta.clone(), None)?;
                Ok((c, next))
            });
            match started {
                Ok((c, next)) => {
                    up.next_generation = up.next_generation.max(next);
                    up.clients.push((i, c));
                }
                Err(e) => up.lose(i, e),
            }
        }
        up.check_quorum()?;
        Ok(up)
    }

    fn lose(&mut self, replica: usize, e: ClientError) {
        warn!(name = %self.name, replica, error = %torpor_pool::error_chain(&e), "pool replica dropped from the upload");
        self.first_error.get_or_insert(e);
    }

    fn check_quorum(&mut self) -> Result<(), ClientError> {
        if self.clients.len() >= self.quorum {
            return Ok(());
        }
        Err(self
            .first_error
            .take()
            .unwrap_or_else(|| ClientError::Unexpected("no pool replica configured".into())))
    }

    /// Runs `op` on every live replica, dropping those that fail.
    fn each(
        &mut self,
        mut op: impl FnMut(&mut PoolClient) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut lost = Vec::new();
        self.clients.retain_mut(|(i, c)| match op(c) {
            Ok(()) => true,
            Err(e) => {
                lost.push((*i, e));
                false
            }
        });
        for (i, e) in lost {
            self.lose(i, e);
        }
        self.check_quorum()
    }

    pub fn file_open(&mut self, id: u32, name: &str) -> Result<(), ClientError> {
        if self.key.is_some() {
            self.open
                .insert(id, (name.to_string(), FileDigest::default()));
        }
        self.each(|c| c.file_open(id, name))
    }

    /// Sends up to one chunk of a file's bytes.
    pub fn file_data(&mut self, id: u32, bytes: &[u8]) -> Result<(), ClientError> {
        if let Some((_, d)) = self.open.get_mut(&id) {
            d.update(bytes);
        }
        self.each(|c| c.file_data(id, bytes))
    }

    pub fn file_close(&mut self, id: u32, size: u64) -> Result<(), ClientError> {
        if let Some((name, d)) = self.open.remove(&id) {
            self.sealed.push(d.finish(&name));
        }
        self.each(|c| c.file_close(id, size))
    }

    /// Seals and commits on every live replica; counts once the quorum committed. Replicas
    /// that committed when the quorum was not met have the generation deleted again.
    pub fn commit(mut self) -> Result<Committed, ClientError> {
        let generation = self.next_generation;
        let sealed = std::mem::take(&mut self.sealed);
        let seal = self
            .key
            .as_ref()
            .map(|k| k.seal(&self.name, generation, &self.meta, sealed));
        let mut done: Option<Committed> = None;
        let mut committed_on = Vec::new();
        let clients = std::mem::take(&mut self.clients);
        for (i, mut c) in clients {
            match c.commit(Some(generation), seal.clone()) {
                Ok(info) => {
                    let d = done.get_or_insert(Committed {
                        generation: info.generation,
                        bytes: info.bytes,
                        tier: info.tier,
                        replicas: 0,
                    });
                    d.replicas += 1;
                    committed_on.push(c);
                }
                Err(e) => self.lose(i, e),
            }
        }
        match done {
            Some(d) if d.replicas >= self.quorum => Ok(d),
            _ => {
                for mut c in committed_on {
                    let _ = c.delete(&self.name, Some(generation));
                }
                Err(self
                    .first_error
                    .take()
                    .unwrap_or_else(|| ClientError::Unexpected("no pool replica committed".into())))
            }
        }
    }
}

/// Checks a manifest fetched for `name` (and `generation`, when one was asked for) against
/// this node's key: the seal must be this key's, bind this name, generation and metadata, and
/// cover exactly the manifest's files. Each file's bytes are then checked as they arrive.
/// Without a key (a pool inside this process) only the name and generation are checked.
pub fn verify_manifest(
    key: Option<&NodeKey>,
    name: &str,
    generation: Option<u64>,
    manifest: &Manifest,
) -> Result<(), SealError> {
    if manifest.name != name || generation.is_some_and(|g| g != manifest.generation) {
        return Err(SealError::BadMac);
    }
    let Some(key) = key else {
        return Ok(());
    };
    let seal = manifest.seal.as_ref().ok_or(SealError::Missing)?;
    key.verify(name, manifest.generation, &manifest.meta, seal)?;
    seal.covers(manifest.files.iter().map(|f| (f.name.as_str(), f.size)))
}

/// Fetches one whole file of a verified manifest into `buf` (cleared first), checked against
/// the manifest's seal when `verify` (not for a pool in this process); returns its size.
pub fn fetch_file_into(
    client: &mut PoolClient,
    manifest: &Manifest,
    file: &str,
    verify: bool,
    buf: &mut Vec<u8>,
) -> Result<u64, FetchError> {
    let sealed = if verify {
        Some(
            manifest
                .seal
                .as_ref()
                .ok_or(SealError::Missing)
                .and_then(|s| s.file(file))?,
        )
    } else {
        None
    };
    buf.clear();
    let mut digest = FileDigest::default();
    let n = client.get_file(&manifest.name, manifest.generation, file, |b| {
        if sealed.is_some() {
            digest.update(b);
        }
        buf.extend_from_slice(b);
        Ok(())
    })?;
    if let Some(s) = sealed {
        digest.check(s)?;
    }
    Ok(n)
}

/// Why a snapshot could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Pool(#[from] ClientError),
    #[error("snapshot refused: it cannot be verified with this node's key")]
    Unverified(#[from] SealError),
}

/// The first replica (from `from` on) that has `name` (`generation`, or the newest) under a
/// seal this node verifies: its index, an authenticated connection and the manifest. Every
/// replica's refusal is logged; the last one is returned when none qualifies.
pub fn find_verified(
    pools: &Pools,
    from: usize,
    name: &str,
    generation: Option<u64>,
) -> Result<(usize, PoolClient, Manifest), FetchError> {
    let mut last = None;
    for (i, target) in pools.replicas.iter().enumerate().skip(from) {
        let found = target
            .connect()
            .and_then(|mut c| c.manifest(name, generation).map(|m| (c, m)))
            .map_err(FetchError::from)
            .and_then(|(c, m)| {
                verify_manifest(pools.key.as_deref(), name, generation, &m)?;
                Ok((c, m))
            });
        match found {
            Ok((c, m)) => return Ok((i, c, m)),
            Err(e) => {
                warn!(name, replica = i, error = %torpor_pool::error_chain(&e), "pool replica cannot serve the snapshot");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        FetchError::Pool(ClientError::Unexpected("no pool replica configured".into()))
    }))
}

impl FetchError {
    /// The snapshot is gone or untrustworthy on that replica (as opposed to unreachable).
    pub fn is_lost(&self) -> bool {
        match self {
            FetchError::Unverified(_) => true,
            FetchError::Pool(e) => matches!(
                e.pool_code(),
                Some(
                    torpor_image::wire::ErrorCode::NotFound
                        | torpor_image::wire::ErrorCode::Corrupt
                )
            ),
        }
    }
}
