//! The two exposition formats a scraper may ask for: OpenMetrics 1.0 and Prometheus text
//! 0.0.4. One writer serves both; they differ in how a counter family is named (`name` with
//! `name_total` samples, vs `name_total` throughout), in escaping, and in the final `# EOF`.

use std::fmt::Write;

use crate::model::metrics::{MetricKind, MetricWriter, Value};

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Text,
}

impl Format {
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header prefers: OpenMetrics when it ranks
    /// `application/openmetrics-text` above `text/plain` (as Prometheus does); else, for
    /// `text/plain`, `*/*` (curl, `promtool check metrics`) and without the header, the
    /// Prometheus text format, which every scraper and linter reads.
    pub(crate) fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Text;
        };
        let (mut open_metrics, mut text) = (-1.0_f64, -1.0_f64);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f64>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => open_metrics = open_metrics.max(q),
                "text/plain" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if open_metrics > text {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }
}

/// Writes families as text in `format`.
#[derive(Debug)]
pub(crate) struct TextWriter {
    format: Format,
    out: String,
    /// The current family: its sample name (with `_total` for counters).
    sample_name: String,
    /// The text of the last histogram's bucket bounds (every instance's are the same).
    bounds: Vec<(f64, String)>,
}

impl TextWriter {
    pub(crate) fn new(format: Format) -> Self {
        Self {
            format,
            out: String::with_capacity(64 * 1024),
            sample_name: String::new(),
            bounds: Vec::new(),
        }
    }

    /// The exposition, terminated as the format wants.
    pub(crate) fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }

    fn labels(&mut self, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
        if labels.is_empty() && extra.is_none() {
            return;
        }
        self.out.push('{');
        for (i, (name, value)) in labels.iter().chain(extra.as_ref()).enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(name);
            self.out.push_str("=\"");
            escape_label(&mut self.out, value);
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn line(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        extra: Option<(&str, &str)>,
        value: Value,
    ) {
        let name = std::mem::take(&mut self.sample_name);
        self.out.push_str(&name);
        self.out.push_str(suffix);
        self.sample_name = name;
        self.labels(labels, extra);
        self.out.push(' ');
        write_value(&mut self.out, value);
        self.out.push('\n');
    }
}

impl MetricWriter for TextWriter {
    fn family(&mut self, name: &str, help: &str, kind: MetricKind) {
        let family = match (self.format, kind) {
            (Format::Text, MetricKind::Counter) => format!("{name}_total"),
            _ => name.to_owned(),
        };
        self.sample_name = match kind {
            MetricKind::Counter => format!("{name}_total"),
            _ => name.to_owned(),
        };
        let kind = match kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        let _ = write!(self.out, "# HELP {family} ");
        for c in help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '"' if self.format == Format::OpenMetrics => self.out.push_str("\\\""),
                c => self.out.push(c),
            }
        }
        let _ = writeln!(self.out, "\n# TYPE {family} {kind}");
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: Value) {
        self.line("", labels, None, value);
    }

    fn histogram(&mut self, labels: &[(&str, &str)], buckets: &[(f64, u64)], sum: f64) {
        let same_bounds = self.bounds.len() == buckets.len()
            && self
                .bounds
                .iter()
                .zip(buckets)
                .all(|((a, _), (b, _))| a.to_bits() == b.to_bits());
        if !same_bounds {
            self.bounds = buckets
                .iter()
                .map(|(le, _)| {
                    let mut text = String::new();
                    write_value(&mut text, Value::Float(*le));
                    (*le, text)
                })
                .collect();
        }
        let bounds = std::mem::take(&mut self.bounds);
        let mut cumulative = 0;
        for ((_, count), (_, bound)) in buckets.iter().zip(&bounds) {
            cumulative += count;
            self.line(
                "_bucket",
                labels,
                Some(("le", bound)),
                Value::Uint(cumulative),
            );
        }
        self.bounds = bounds;
        self.line("_sum", labels, None, Value::Float(sum));
        self.line("_count", labels, None, Value::Uint(cumulative));
    }
}

/// Appends `value` escaped as a label value: the runs between the three special bytes (all
/// ASCII, so every cut falls between characters) are copied whole. A scrape escapes every
/// label of every series: at 1000 instances, character-by-character pushing was its largest
/// cost.
fn escape_label(out: &mut String, value: &str) {
    let bytes = value.as_bytes();
    let mut start = 0;
    for at in memchr::memchr3_iter(b'\\', b'"', b'\n', bytes) {
        out.push_str(&value[start..at]);
        out.push_str(match bytes[at] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        });
        start = at + 1;
    }
    out.push_str(&value[start..]);
}

fn write_value(out: &mut String, value: Value) {
    let _ = match value {
        Value::Int(n) => write!(out, "{n}"),
        Value::Uint(n) => write!(out, "{n}"),
        Value::Float(f) if f.is_nan() => write!(out, "NaN"),
        Value::Float(f) if f == f64::INFINITY => write!(out, "+Inf"),
        Value::Float(f) if f == f64::NEG_INFINITY => write!(out, "-Inf"),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => write!(out, "{f:.1}"),
        Value::Float(f) => write!(out, "{f}"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(format: Format) -> String {
        let mut w = TextWriter::new(format);
        w.family("requests", "Requests \"served\".", MetricKind::Counter);
        w.sample(&[("code", "2\"0\\0\n")], Value::Uint(3));
        w.family("temperature", "Now.", MetricKind::Gauge);
        w.sample(&[], Value::Float(0.5));
        w.family("latency_seconds", "Waits.", MetricKind::Histogram);
        w.histogram(&[("a", "b")], &[(0.001, 2), (f64::INFINITY, 1)], 0.25);
        w.finish()
    }

    #[test]
    fn open_metrics() {
        assert_eq!(
            render(Format::OpenMetrics),
            "# HELP requests Requests \\\"served\\\".\n# TYPE requests counter\n\
             requests_total{code=\"2\\\"0\\\\0\\n\"} 3\n\
             # HELP temperature Now.\n# TYPE temperature gauge\ntemperature 0.5\n\
             # HELP latency_seconds Waits.\n# TYPE latency_seconds histogram\n\
             latency_seconds_bucket{a=\"b\",le=\"0.001\"} 2\n\
             latency_seconds_bucket{a=\"b\",le=\"+Inf\"} 3\n\
             latency_seconds_sum{a=\"b\"} 0.25\nlatency_seconds_count{a=\"b\"} 3\n# EOF\n"
        );
    }

    #[test]
    fn prometheus_text() {
        let text = render(Format::Text);
        assert!(text.starts_with(
            "# HELP requests_total Requests \"served\".\n# TYPE requests_total counter\n\
             requests_total{"
        ));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn negotiation() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4;q=1,*/*;q=0.1")),
            Format::Text
        );
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("application/json")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=1.0.0")),
            Format::OpenMetrics
        );
    }
}
