//! turbostat logs, parsed and then summarised as `torpor power` does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use torpor_power::turbostat::TurbostatLog;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(log) = TurbostatLog::parse(&text) {
        let _ = log.summary();
        let _ = log.cpu_means();
        for c in &log.columns {
            let _ = log.summary_mean(c);
        }
    }
});
