//! Results of one suite: the table a person reads, the ratios against baselines, the target
//! checks, and the JSON a machine reads (`{"suite":..,"results":[{"name","metric","value"}],
//! "details":[..],"ratios":[..],"targets":[..],"notes":[..]}`). Shared by every suite.
//!
//! `results` holds the headline numbers that tools compare across runs; secondary numbers
//! (percentiles, say) go to `details`, so that `results` keeps a fixed set of names per suite.

use serde::Serialize;
use std::path::Path;

#[derive(Serialize, Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub metric: String,
    pub value: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Ratio {
    pub metric: String,
    pub name: String,
    pub baseline: String,
    pub value: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub pass: bool,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub suite: String,
    pub results: Vec<Entry>,
    pub details: Vec<Entry>,
    pub ratios: Vec<Ratio>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(suite: &str) -> Report {
        Report {
            suite: suite.into(),
            results: Vec::new(),
            details: Vec::new(),
            ratios: Vec::new(),
            targets: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn add(&mut self, name: &str, metric: &str, value: f64) {
        self.results.push(Entry {
            name: name.into(),
            metric: metric.into(),
            value,
        });
    }

    /// A secondary number: printed and written, but not among the headline `results`.
    pub fn detail(&mut self, name: &str, metric: &str, value: f64) {
        self.details.push(Entry {
            name: name.into(),
            metric: metric.into(),
            value,
        });
    }

    pub fn get(&self, name: &str, metric: &str) -> Option<f64> {
        self.results
            .iter()
            .find(|e| e.name == name && e.metric == metric)
            .map(|e| e.value)
    }

    /// Records `name / baseline` for `metric`, if both were measured.
    pub fn ratio(&mut self, metric: &str, name: &str, baseline: &str) -> Option<f64> {
        let r = self.get(name, metric)? / self.get(baseline, metric)?;
        self.ratios.push(Ratio {
            metric: metric.into(),
            name: name.into(),
            baseline: baseline.into(),
            value: r,
        });
        Some(r)
    }

    /// Records a target check: `ratio(name/baseline) <op> bound`, where lower-is-better
    /// metrics use `at_most`.
    pub fn target(&mut self, metric: &str, name: &str, baseline: &str, bound: f64, at_most: bool) {
        let text = format!(
            "{name} {metric} {} {bound}x {baseline}",
            if at_most { "<=" } else { ">=" }
        );
        let (measured, pass) = match (self.get(name, metric), self.get(baseline, metric)) {
            (Some(a), Some(b)) if b > 0.0 => {
                let r = a / b;
                let pass = if at_most { r <= bound } else { r >= bound };
                (format!("{r:.2}x"), pass)
            }
            _ => ("not measured".into(), false),
        };
        self.targets.push(Target {
            target: text,
            measured,
            pass,
        });
    }

    /// Records an absolute target check on a result or, failing that, a detail:
    /// `name metric <op> bound` with `op` one of `<`, `<=`, `==`, `>=`, `>`.
    pub fn bound(&mut self, name: &str, metric: &str, op: &str, bound: f64) {
        let value = self.get(name, metric).or_else(|| {
            self.details
                .iter()
                .find(|e| e.name == name && e.metric == metric)
                .map(|e| e.value)
        });
        let (measured, pass) = match value {
            Some(v) => {
                let pass = match op {
                    "<" => v < bound,
                    "<=" => v <= bound,
                    "==" => v == bound,
                    ">=" => v >= bound,
                    ">" => v > bound,
                    _ => false,
                };
                (human(v), pass)
            }
            None => ("not measured".into(), false),
        };
        self.targets.push(Target {
            target: format!("{name} {metric} {op} {}", human(bound)),
            measured,
            pass,
        });
    }

    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    pub fn print(&self) {
        println!();
        println!("== {} ==", self.suite);
        println!(
            "{:<22} {:<16} {:>18}  vs baseline",
            "name", "metric", "value"
        );
        for e in &self.results {
            // Ratios sit next to the number they qualify, so one line reads on its own.
            let vs: Vec<String> = self
                .ratios
                .iter()
                .filter(|r| r.name == e.name && r.metric == e.metric)
                .map(|r| format!("{:.2}x {}", r.value, r.baseline))
                .collect();
            println!(
                "{:<22} {:<16} {:>18}  {}",
                e.name,
                e.metric,
                human(e.value),
                vs.join(", ")
            );
        }
        if !self.details.is_empty() {
            println!();
            println!("details");
            for e in &self.details {
                println!("  {:<20} {:<16} {:>18}", e.name, e.metric, human(e.value));
            }
        }
        if !self.targets.is_empty() {
            println!();
            println!("targets");
            for t in &self.targets {
                println!(
                    "  {:<4} {:<48} measured {}",
                    if t.pass { "PASS" } else { "MISS" },
                    t.target,
                    t.measured
                );
            }
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let s = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, s).map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

/// Numbers with thousands separators, keeping up to two decimals for small values.
fn human(v: f64) -> String {
    if v.abs() < 100.0 {
        return format!("{v:.2}");
    }
    let s = format!("{:.0}", v);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_targets() {
        let mut r = Report::new("t");
        r.add("a", "one_way_ns", 300.0);
        r.add("b", "one_way_ns", 200.0);
        assert_eq!(r.ratio("one_way_ns", "a", "b"), Some(1.5));
        r.target("one_way_ns", "a", "b", 1.5, true);
        r.target("one_way_ns", "a", "b", 1.4, true);
        r.target("one_way_ns", "a", "missing", 1.0, true);
        assert!(r.targets[0].pass);
        assert!(!r.targets[1].pass);
        assert!(!r.targets[2].pass);
        r.detail("a", "p99_ns", 900.0);
        assert_eq!(r.results.len(), 2);
        assert_eq!(r.get("a", "p99_ns"), None);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["results"][0]["name"], "a");
        assert_eq!(json["details"][0]["metric"], "p99_ns");
        r.bound("a", "p99_ns", "<", 1000.0);
        r.bound("a", "one_way_ns", ">=", 301.0);
        r.bound("a", "missing", "<", 1.0);
        assert!(r.targets[3].pass);
        assert!(!r.targets[4].pass);
        assert!(!r.targets[5].pass);
        assert_eq!(r.targets[3].target, "a p99_ns < 1,000");
        assert_eq!(human(1234567.0), "1,234,567");
        assert_eq!(human(12.345), "12.35");
    }
}
