//! What a request is: a `Target` sends one and says whether it succeeded. HTTP GET and the
//! sample service's line protocol are here; the µSuite clients implement it too.

use std::{net::SocketAddr, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Something requests go to.
#[async_trait]
pub trait Target: Send + Sync {
    /// Sends request number `seq`; an error is a short reason ("status 503", "timeout").
    async fn call(&self, seq: u64) -> Result<(), String>;
    /// For reports.
    fn describe(&self) -> String;
}

/// HTTP/1.1 GET of one URL, over pooled connections.
#[derive(Debug)]
pub struct HttpGet {
    client: Client<HttpConnector, Empty<Bytes>>,
    uri: hyper::Uri,
}

impl HttpGet {
    pub fn new(url: &str) -> Result<HttpGet, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{url:?}: only http:// URLs"));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(HttpGet {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            uri,
        })
    }
}

#[async_trait]
impl Target for HttpGet {
    async fn call(&self, _seq: u64) -> Result<(), String> {
        let resp = self.client.get(self.uri.clone()).await.map_err(|e| {
            if e.is_connect() {
                "connect".to_string()
            } else {
                "http".to_string()
            }
        })?;
        let status = resp.status();
        resp.into_body()
            .collect()
            .await
            .map_err(|_| "body".to_string())?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {}", status.as_u16()))
        }
    }

    fn describe(&self) -> String {
        format!("GET {}", self.uri)
    }
}

/// One line out, one line back, on a fresh TCP connection (the sample service's protocol).
#[derive(Debug)]
pub struct TcpLine {
    pub addr: SocketAddr,
    pub line: String,
}

#[async_trait]
impl Target for TcpLine {
    async fn call(&self, _seq: u64) -> Result<(), String> {
        let mut s = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|_| "connect".to_string())?;
        s.set_nodelay(true).map_err(|_| "socket".to_string())?;
        s.write_all(format!("{}\n", self.line).as_bytes())
            .await
            .map_err(|_| "write".to_string())?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .await
            .map_err(|_| "read".to_string())?;
        if answer.is_empty() {
            Err("closed".into())
        } else {
            Ok(())
        }
    }

    fn describe(&self) -> String {
        format!("tcp {} {:?}", self.addr, self.line)
    }
}
