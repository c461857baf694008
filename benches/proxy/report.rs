//! What the harness prints around the scenarios: the machine it ran on,
//! each figure against its target (`met`, `MISSED` or `skipped`) at the
//! end, and the units the tables use. Each scenario prints its own tables.

use std::fs;
use std::time::Duration;

use crate::Mode;

/// A figure against its target from the issue.
pub struct Verdict {
    pub target: &'static str,
    pub value: String,
    /// `None` when it could not be measured here.
    pub met: Option<bool>,
}

impl Verdict {
    pub fn new(target: &'static str, value: String, met: bool) -> Self {
        Self {
            target,
            value,
            met: Some(met),
        }
    }
}

/// The machine the figures come from, and what shares its CPUs.
pub fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {cpus} CPUs ({model}), Linux {}; load average {}",
        kernel.trim(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("note: the load generator, the proxy under test and the upstream share these {cpus} CPUs");
}

/// The closing list: every target with what was measured against it.
pub fn print_targets(mode: Mode, verdicts: &[Verdict]) {
    println!();
    println!(
        "== targets (measured, not asserted){}",
        match mode {
            Mode::Smoke => "; smoke run, figures not meaningful",
            Mode::Full => "",
        }
    );
    for verdict in verdicts {
        let status = match verdict.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "skipped",
        };
        println!("  {status:<7} {}: {}", verdict.target, verdict.value);
    }
}

/// A latency as the tables print it.
pub fn ms(duration: Duration) -> String {
    format!("{:.3}ms", duration.as_secs_f64() * 1e3)
}

/// A queue wait as the tables print it.
pub fn secs(duration: Duration) -> String {
    format!("{:.2}s", duration.as_secs_f64())
}
