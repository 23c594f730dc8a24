//! RAPL energy counters through powercap (`/sys/class/powercap/intel-rapl:*`): package, DRAM and
//! sub-domains. The counters wrap at `max_energy_range_uj`; a delta across the wrap is handled.

use serde::Serialize;

use crate::{
    cpuidle::HostRoots,
    sysfs::{read_attr, read_number},
    TelemetryError,
};

/// What a zone measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneKind {
    Package,
    Dram,
    /// core, uncore, psys: reported, not added to the totals (they overlap package).
    Other,
}

/// One zone's counter at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZoneReading {
    /// Directory name, `intel-rapl:0` or `intel-rapl:0:0`.
    pub zone: String,
    /// The zone's own name (`package-0`, `dram`, `core`).
    pub name: String,
    pub kind: ZoneKind,
    pub energy_uj: u64,
    pub max_energy_range_uj: u64,
}

impl ZoneReading {
    /// Energy from `earlier` to `self`, across at most one wrap.
    pub fn joules_since(&self, earlier: &ZoneReading) -> f64 {
        let uj = if self.energy_uj >= earlier.energy_uj {
            self.energy_uj - earlier.energy_uj
        } else {
            // The counter passed max_energy_range_uj and restarted at 0.
            self.max_energy_range_uj.saturating_sub(earlier.energy_uj) + self.energy_uj
        };
        uj as f64 / 1e6
    }
}

/// Every RAPL zone under the powercap class; empty where there is none (VMs, most ARM).
pub fn read_zones(roots: &HostRoots) -> Result<Vec<ZoneReading>, TelemetryError> {
    let class = roots.sys.join("class/powercap");
    let Ok(entries) = std::fs::read_dir(&class) else {
        return Ok(Vec::new());
    };
    let mut zones = Vec::new();
    for entry in entries.flatten() {
        let zone = entry.file_name().to_string_lossy().into_owned();
        // intel-rapl (also AMD's); the mmio twin of package-0 would count it twice.
        if !zone.starts_with("intel-rapl:") {
            continue;
        }
        let dir = entry.path();
        let name = read_attr(&dir.join("name"))?;
        let kind = if name.starts_with("package") {
            ZoneKind::Package
        } else if name == "dram" {
            ZoneKind::Dram
        } else {
            ZoneKind::Other
        };
        zones.push(ZoneReading {
            zone,
            name,
            kind,
            energy_uj: read_number(&dir.join("energy_uj"))?,
            max_energy_range_uj: read_number(&dir.join("max_energy_range_uj"))?,
        });
    }
    zones.sort_by(|a, b| a.zone.cmp(&b.zone));
    Ok(zones)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(energy_uj: u64) -> ZoneReading {
        ZoneReading {
            zone: "intel-rapl:0".into(),
            name: "package-0".into(),
            kind: ZoneKind::Package,
            energy_uj,
            max_energy_range_uj: 262_143_328_850,
        }
    }

    #[test]
    fn delta_without_wrap() {
        assert_eq!(zone(3_000_000).joules_since(&zone(1_000_000)), 2.0);
    }

    #[test]
    fn delta_across_the_wrap() {
        let before = zone(262_143_328_850 - 500_000);
        let after = zone(1_500_000);
        assert_eq!(after.joules_since(&before), 2.0);
    }
}
