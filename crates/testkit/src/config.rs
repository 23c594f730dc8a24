//! A typed torpor.toml for tests: the sections and keys that tests write, rendered with the
//! `toml` crate, so that no test assembles the file with `format!` (quoting, section order
//! and a key landing in the wrong table are the serialiser's business). It describes what a
//! test writes, not what `torpor up` accepts: `torpor_up::Config` stays the one reader, and a
//! test may write a value it knows to be wrong to see it refused. The services tests run
//! most (the binary's sample service, redis from apt) have constructors here.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// A whole torpor.toml. Sections left `None` are not written, so `torpor up` applies its
/// defaults to them as it does to a user's file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    /// `[node]`: a namespace of its own keeps one test's services apart from another's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Node>,
    /// `[pool]`: every test names its pool (embedded with a capacity, or an address).
    pub pool: Pool,
    /// `[status]`: where tests read the status API; [`Config::status`] sets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// `[control]`: tests running several `torpor up` at once give each its own socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    /// `[power]`: only tests of the knobs turn it on, on a fake sysfs tree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<Power>,
    /// `[[service]]`, in order (reports and errors name services by index).
    #[serde(rename = "service", skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
}

/// An embedded pool large enough for every test service of the end-to-end tests.
pub fn embedded() -> Config {
    Config::embedded("768MiB")
}

impl Config {
    /// An embedded pool of `capacity` and nothing else yet.
    pub fn embedded(capacity: &str) -> Config {
        Config {
            pool: Pool {
                capacity: Some(capacity.into()),
                ..Pool::default()
            },
            ..Config::default()
        }
    }

    /// With the namespace `namespace` (a `[node]` section if there was none).
    pub fn namespace(mut self, namespace: &str) -> Config {
        self.node.get_or_insert_with(Node::default).namespace = Some(namespace.into());
        self
    }

    /// With the status API on `listen`.
    pub fn status(mut self, listen: SocketAddr) -> Config {
        self.status = Some(Status { listen });
        self
    }

    /// With `services` added after those already there.
    pub fn services(mut self, services: impl IntoIterator<Item = Service>) -> Config {
        self.services.extend(services);
        self
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        // Strings, paths, numbers and tables only: nothing here can fail to render.
        toml::to_string(self).expect("a test config renders as TOML")
    }

    /// Writes the file as `dir/torpor.toml` and returns that path.
    pub fn write_in(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("torpor.toml");
        std::fs::write(&path, self.to_toml())?;
        Ok(path)
    }
}

/// `[node]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Node {
    /// Services' cgroups and snapshot names carry it: tests that run at once stay apart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Where kept services are recorded; tests of keeping put it in their temp dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// The most memory the services up may hold: the governor test fits one of two.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<String>,
}

/// `[pool]`: embedded (`capacity`, `spill_dir`) or remote (`address`, `token_file`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pool {
    /// The embedded pool's RAM tier; tests keep it small, as it is pre-faulted at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// The disk tier, for tests whose snapshots must outlive `torpor up`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spill_dir: Option<PathBuf>,
    /// A `torpor pool` started by the test instead of the embedded one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// That pool's token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// `[status]`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// An address of the test's own (the default port would collide between tests).
    pub listen: SocketAddr,
}

/// `[control]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Control {
    /// The Unix socket; the default path is the host's, which tests must not take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// A TCP endpoint, for the test of token-checked remote commands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The TCP endpoint's token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// `[power]`: the knobs a test turns, under a fake sysfs root.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Power {
    /// A platform profile file (tests write a quick-suspend variant).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<PathBuf>,
    /// The fake sysfs tree: tests never turn the real knobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knob_root: Option<PathBuf>,
    /// Where changed knobs are journaled, so a test can see them put back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<PathBuf>,
    /// Knobs and node sleep only logged (the node sleep then credited as a dry run).
    #[serde(skip_serializing_if = "is_false")]
    pub dry_run: bool,
    /// Off unless set: written only when on, as a user would.
    #[serde(skip_serializing_if = "is_false")]
    pub consolidate: bool,
    /// As `consolidate`.
    #[serde(skip_serializing_if = "is_false")]
    pub deep_idle: bool,
    /// As `consolidate`.
    #[serde(skip_serializing_if = "is_false")]
    pub offline_idle_cores: bool,
    /// The PM QoS value held while a service wakes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wake_latency_us: Option<i32>,
    /// `[power.node_sleep]`: hooks a test can watch run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_sleep: Option<NodeSleep>,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// `[power.node_sleep]`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSleep {
    /// Run when the node goes to sleep.
    pub sleep: Vec<String>,
    /// Run when it wakes.
    pub wake: Vec<String>,
    /// Quiet needed before the node sleeps.
    pub after: String,
}

/// One `[[service]]`, a process tree (`command`) or an OCI container (`bundle`).
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    /// Its name in status, commands and snapshot names.
    pub name: String,
    /// The process tree to run; `None` for a container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// The OCI bundle to run with runc; `None` for a process tree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// For a service run as another user, from a directory only it may enter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Its working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// The gate's address, which clients use.
    pub listen: SocketAddr,
    /// The service's own address behind the gate.
    pub backend: SocketAddr,
    /// `"http"` (the default) or `"tcp"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `"proxy"` (the default) or `"kernel"`: tests of both modes set it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<String>,
    /// How long a sleep waits for requests in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_deadline: Option<String>,
    /// How long a start may take before it counts as failed (slow under CRIU load).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<String>,
    /// `"eager"` or `"lazy"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// A lazy restore's prefetch of the working set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<bool>,
    /// A lazy restore's background fill of the rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background_fill: Option<bool>,
    /// `[service.policy]`.
    pub policy: Policy,
}

impl Service {
    /// `name` running `command`, its gate on `listen`, itself on `backend`, the policy's
    /// defaults otherwise.
    pub fn new<S: AsRef<str>>(
        name: &str,
        command: &[S],
        listen: SocketAddr,
        backend: SocketAddr,
    ) -> Service {
        Service {
            name: name.into(),
            command: Some(command.iter().map(|a| a.as_ref().to_string()).collect()),
            bundle: None,
            user: None,
            cwd: None,
            listen,
            backend,
            protocol: None,
            steering: None,
            drain_deadline: None,
            start_timeout: None,
            restore: None,
            prefetch: None,
            background_fill: None,
            policy: Policy::default(),
        }
    }

    /// A subcommand of the torpor binary under test ([`crate::exe`]), `args` its arguments.
    pub fn torpor<S: AsRef<str>>(
        name: &str,
        args: &[S],
        listen: SocketAddr,
        backend: SocketAddr,
    ) -> Service {
        let exe = crate::exe().display().to_string();
        let command: Vec<&str> = std::iter::once(exe.as_str())
            .chain(args.iter().map(AsRef::as_ref))
            .collect();
        Service::new(name, &command, listen, backend)
    }

    /// The sample HTTP service (`torpor sample-service`) holding `memory` of seeded state.
    pub fn sample(name: &str, listen: SocketAddr, backend: SocketAddr, memory: &str) -> Service {
        let backend_text = backend.to_string();
        Service::torpor(
            name,
            &[
                "sample-service",
                "--listen",
                &backend_text,
                "--memory",
                memory,
            ],
            listen,
            backend,
        )
    }

    /// redis-server from apt (protocol tcp), without persistence, its working files in `dir`.
    pub fn redis(name: &str, listen: SocketAddr, backend: SocketAddr, dir: &Path) -> Service {
        let (backend_port, backend_ip, dir) = (
            backend.port().to_string(),
            backend.ip().to_string(),
            dir.display().to_string(),
        );
        Service::new(
            name,
            &[
                "redis-server",
                "--port",
                &backend_port,
                "--bind",
                &backend_ip,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir,
            ],
            listen,
            backend,
        )
        .protocol("tcp")
    }

    /// With `args` added to its command.
    pub fn args(mut self, args: &[&str]) -> Service {
        self.command
            .get_or_insert_with(Vec::new)
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// With the policy's idle threshold `idle`.
    pub fn idle(mut self, idle: &str) -> Service {
        self.policy.idle_threshold = Some(idle.into());
        self
    }

    /// With steering `steering`.
    pub fn steering(mut self, steering: &str) -> Service {
        self.steering = Some(steering.into());
        self
    }

    /// With protocol `protocol`.
    pub fn protocol(mut self, protocol: &str) -> Service {
        self.protocol = Some(protocol.into());
        self
    }
}

/// `[service.policy]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Policy {
    /// Short to make a service sleep within a test, an hour to keep it awake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_threshold: Option<String>,
    /// Changed by the reload test to see a policy change applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sleep_rate: Option<f64>,
    /// As `max_sleep_rate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_queue: Option<usize>,
    /// `energy` for the governor's tests; the default (threshold) otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub governor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sections_in_place_and_leaves_out_what_is_unset() {
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let cfg = Config::embedded("64MiB")
            .namespace("t")
            .status(addr)
            .services([Service::new("a \"quoted\"", &["x", "--y"], addr, addr)
                .idle("1h")
                .protocol("tcp")]);
        let text = cfg.to_toml();
        let value: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(value["pool"]["capacity"].as_str(), Some("64MiB"));
        assert_eq!(value["node"]["namespace"].as_str(), Some("t"));
        assert_eq!(value["status"]["listen"].as_str(), Some("127.0.0.1:7000"));
        let svc = &value["service"][0];
        assert_eq!(svc["name"].as_str(), Some("a \"quoted\""));
        assert_eq!(svc["protocol"].as_str(), Some("tcp"));
        assert_eq!(svc["policy"]["idle_threshold"].as_str(), Some("1h"));
        assert!(svc.get("steering").is_none(), "{text}");
        assert!(value.get("power").is_none() && value.get("control").is_none());
    }
}
