//! A fake host tree (sysfs, procfs, cgroup fs, /dev) for tests of code that must never touch the
//! real knobs.

use std::path::{Path, PathBuf};

pub struct FakeHost {
    pub dir: tempfile::TempDir,
}

pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

impl FakeHost {
    /// `cpus` online CPUs with POLL and haltpoll-like states, and a /proc/stat.
    pub fn new(cpus: usize) -> FakeHost {
        let host = FakeHost {
            dir: tempfile::tempdir().unwrap(),
        };
        write(&host.cpu_dir().join("online"), &format!("0-{}\n", cpus - 1));
        write(
            &host.cpu_dir().join("possible"),
            &format!("0-{}\n", cpus - 1),
        );
        for cpu in 0..cpus {
            let d = host.cpu_dir().join(format!("cpu{cpu}"));
            if cpu > 0 {
                write(&d.join("online"), "1\n");
            }
            for (i, (name, lat, res)) in [("POLL", 0, 0), ("C1", 2, 2), ("C6", 133, 600)]
                .iter()
                .enumerate()
            {
                let s = d.join(format!("cpuidle/state{i}"));
                write(&s.join("name"), &format!("{name}\n"));
                write(&s.join("latency"), &format!("{lat}\n"));
                write(&s.join("residency"), &format!("{res}\n"));
                write(&s.join("time"), "0\n");
                write(&s.join("usage"), "0\n");
                write(&s.join("disable"), "0\n");
            }
        }
        host.set_stat(&vec![(0, 0); cpus]);
        host
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn roots(&self) -> torpor_power::HostRoots {
        torpor_power::HostRoots::under(self.root())
    }

    pub fn cpu_dir(&self) -> PathBuf {
        self.root().join("sys/devices/system/cpu")
    }

    pub fn state_file(&self, cpu: usize, state: usize, file: &str) -> PathBuf {
        self.cpu_dir()
            .join(format!("cpu{cpu}/cpuidle/state{state}/{file}"))
    }

    pub fn set_state(&self, cpu: usize, state: usize, time_us: u64, usage: u64) {
        write(
            &self.state_file(cpu, state, "time"),
            &format!("{time_us}\n"),
        );
        write(&self.state_file(cpu, state, "usage"), &format!("{usage}\n"));
    }

    /// (busy, idle) ticks per CPU.
    pub fn set_stat(&self, ticks: &[(u64, u64)]) {
        let mut text = String::from("cpu  0 0 0 0 0 0 0 0 0 0\n");
        for (cpu, (busy, idle)) in ticks.iter().enumerate() {
            text.push_str(&format!("cpu{cpu} {busy} 0 0 {idle} 0 0 0 0 0 0\n"));
        }
        text.push_str("intr 0\nctxt 0\n");
        write(&self.root().join("proc/stat"), &text);
    }

    pub fn add_rapl_zone(&self, zone: &str, name: &str, energy_uj: u64, max_uj: u64) {
        let d = self.root().join("sys/class/powercap").join(zone);
        write(&d.join("name"), &format!("{name}\n"));
        write(&d.join("energy_uj"), &format!("{energy_uj}\n"));
        write(&d.join("max_energy_range_uj"), &format!("{max_uj}\n"));
    }

    pub fn cgroup(&self) -> PathBuf {
        self.root().join("cgroup")
    }
}
