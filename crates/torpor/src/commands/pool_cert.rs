//! `torpor pool-cert`: a self-signed certificate for a TCP pool (and, for mutual TLS, a client CA
//! and a client certificate).

use std::path::PathBuf;

use anyhow::Result;

/// Arguments of `torpor pool-cert`.
#[derive(Debug, clap::Args)]
pub struct PoolCertArgs {
    /// Directory to write into (existing files are never overwritten).
    dir: PathBuf,
    /// Names the certificate is issued for (DNS names or IP addresses). Clients pin the
    /// certificate itself, so these are informational.
    #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
    names: Vec<String>,
    /// Also write client-ca.crt (for `torpor pool --tls-client-ca`), client.crt and
    /// client.key (for `--pool-client-cert`/`--pool-client-key`).
    #[arg(long)]
    client: bool,
}

/// Writes the files and names them.
pub fn run(args: &PoolCertArgs) -> Result<()> {
    let g = torpor_pool::tls::generate(&args.dir, &args.names, args.client)?;
    println!("pool certificate: {}", g.pool_cert.display());
    println!("pool key:         {}", g.pool_key.display());
    if let Some((ca, cert, key)) = g.client {
        println!("client CA:        {}", ca.display());
        println!("client cert:      {}", cert.display());
        println!("client key:       {}", key.display());
    }
    Ok(())
}
