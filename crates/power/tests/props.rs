//! Property tests of the text power reads from outside: turbostat logs and kernel CPU lists.
//! A log torpor could have written reads back as written; any text at all gives a value or an
//! error, never a panic or a runaway allocation.

use std::collections::BTreeSet;

use proptest::prelude::*;
use torpor_power::{cpulist, turbostat::TurbostatLog};

/// Columns a turbostat log may carry after the topology ones and `Busy%` (which it always
/// shows, and which marks its column header).
const METRICS: &[&str] = &[
    "Avg_MHz", "Bzy_MHz", "CPU%c1", "CPU%c6", "PkgWatt", "RAMWatt",
];

/// One interval: the summary row's values, then each CPU's.
type Interval = (Vec<f64>, Vec<Vec<f64>>);

/// Values turbostat prints (two decimals), exact through Display and parse.
fn value() -> impl Strategy<Value = f64> {
    (0u32..1_000_000).prop_map(|v| f64::from(v) / 100.0)
}

fn log() -> impl Strategy<Value = (Vec<&'static str>, Vec<Interval>)> {
    (
        prop::sample::subsequence(METRICS, 0..=METRICS.len()),
        1usize..4,
    )
        .prop_flat_map(|(mut metrics, cpus)| {
            metrics.insert(0, "Busy%");
            let n = metrics.len();
            let row = move || prop::collection::vec(value(), n);
            let interval = (row(), prop::collection::vec(row(), cpus));
            (Just(metrics), prop::collection::vec(interval, 1..5))
        })
}

fn render(metrics: &[&str], intervals: &[Interval]) -> String {
    let mut text = String::from("turbostat version 2023.11.07\nCPUID(0): GenuineIntel\n");
    let header = format!("Package\tCore\tCPU\t{}\n", metrics.join("\t"));
    for (summary, cpus) in intervals {
        text.push_str(&header);
        let cells = |v: &[f64]| v.iter().map(f64::to_string).collect::<Vec<_>>().join("\t");
        text.push_str(&format!("-\t-\t-\t{}\n", cells(summary)));
        for (cpu, row) in cpus.iter().enumerate() {
            text.push_str(&format!("0\t{cpu}\t{cpu}\t{}\n", cells(row)));
        }
    }
    text
}

/// Text made of what turbostat logs hold, so random logs get past the header search.
fn turbostat_like() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        prop::sample::select(vec![
            "Package",
            "Core",
            "CPU",
            "Busy%",
            "PkgWatt",
            "-",
            "sec",
            "\t",
            " ",
            "\n",
            "\n",
            "inf",
            "NaN",
            "-1",
            "1e309",
            "4294967296",
        ])
        .prop_map(str::to_string),
        any::<f64>().prop_map(|v| v.to_string()),
        "[ -~]{0,6}",
    ];
    prop::collection::vec(token, 0..80).prop_map(|t| t.concat())
}

proptest! {
    #[test]
    fn a_turbostat_log_reads_back_as_written((metrics, intervals) in log()) {
        let log = TurbostatLog::parse(&render(&metrics, &intervals)).unwrap();
        prop_assert_eq!(log.preamble.len(), 2);
        prop_assert_eq!(log.intervals.len(), intervals.len());
        for (got, (summary, cpus)) in log.intervals.iter().zip(&intervals) {
            let s = got.summary.as_ref().unwrap();
            prop_assert_eq!((s.package, s.core, s.cpu), (None, None, None));
            for (m, v) in metrics.iter().zip(summary) {
                prop_assert_eq!(s.get(m), Some(*v));
            }
            prop_assert_eq!(got.cpus.len(), cpus.len());
            for (i, (row, values)) in got.cpus.iter().zip(cpus).enumerate() {
                prop_assert_eq!(row.cpu, Some(i as u32));
                for (m, v) in metrics.iter().zip(values) {
                    prop_assert_eq!(row.get(m), Some(*v));
                }
            }
        }
        let mean = intervals.iter().map(|(s, _)| s[0]).sum::<f64>() / intervals.len() as f64;
        prop_assert_eq!(log.summary().busy_pct, Some(mean));
    }

    #[test]
    fn any_text_as_a_turbostat_log_never_panics(text in any::<String>()) {
        if let Ok(log) = TurbostatLog::parse(&text) {
            let _ = log.summary();
        }
    }

    #[test]
    fn turbostat_like_text_never_panics(text in turbostat_like()) {
        if let Ok(log) = TurbostatLog::parse(&text) {
            let _ = log.summary();
            let _ = log.cpu_means();
        }
    }

    #[test]
    fn a_cpu_list_round_trips(cpus in prop::collection::btree_set(0usize..4096, 0..64)) {
        prop_assert_eq!(cpulist::parse(&cpulist::format(&cpus)).unwrap(), cpus);
    }

    #[test]
    fn any_cpu_list_text_parses_or_is_refused(text in "[0-9,\\- x]{0,40}") {
        if let Ok(cpus) = cpulist::parse(&text) {
            prop_assert!(cpus.iter().all(|&c| c < cpulist::MAX_CPUS));
        }
    }
}

#[test]
fn a_cpu_range_beyond_any_machine_is_refused_not_allocated() {
    // Found while writing the torpor_toml fuzz target: `cpuset = "0-18446744073709551615"`
    // made the parser insert every number up to it (a hang, then out of memory).
    let e = cpulist::parse("0-18446744073709551615").unwrap_err();
    assert!(e.contains("0-18446744073709551615"), "{e}");
    assert!(cpulist::parse(&format!("{}", cpulist::MAX_CPUS)).is_err());
    let last = cpulist::MAX_CPUS - 1;
    assert_eq!(
        cpulist::parse(&format!("0-{last}")).unwrap().len(),
        cpulist::MAX_CPUS
    );
    assert_eq!(cpulist::parse("").unwrap(), BTreeSet::new());
}
