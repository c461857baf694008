#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The files under `deploy/` against the proxy they describe: the Grafana
//! dashboard and the Prometheus rules use only metrics (and labels) the
//! proxy exports, every rule is complete, and the scrape config, the
//! Kubernetes manifest and the Dockerfile agree with the proxy's ports,
//! endpoints and config.
//!
//! No Docker, Prometheus or Grafana is needed: the files are parsed and
//! checked here, and the metric names are looked up in the exposition of a
//! real [`Metrics`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use marketo_proxy::config::Config;
use marketo_proxy::metrics::Metrics;
use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

const DASHBOARD: &str = "grafana/marketo-proxy.json";
const ALERTS: &str = "prometheus/alerts.yml";
const SCRAPE_CONFIG: &str = "prometheus/prometheus.yml";
const SIDECAR: &str = "kubernetes/sidecar.yaml";
const DOCKERFILE: &str = "Dockerfile";

/// The alerts the rules file must define.
const EXPECTED_ALERTS: &[&str] = &[
    "MarketoProxyDailyQuota80Percent",
    "MarketoProxyDailyQuota95Percent",
    "MarketoProxyQuotaExhaustionForecast",
    "MarketoProxyUpstreamRateLimited",
    "MarketoProxyUpstreamQuotaExceeded",
    "MarketoProxyQueueWaitHigh",
    "MarketoProxyTokenRefreshFailing",
    "MarketoProxyTokenExpired",
    "MarketoProxyBackendDown",
    "MarketoProxyBackendScriptErrors",
];

/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_path(relative: &str) -> PathBuf {
    repo_root().join("deploy").join(relative)
}

fn read(relative: &str) -> String {
    let path = deploy_path(relative);
    fs::read_to_string(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is valid JSON")
}

fn alert_rules() -> Yaml {
    serde_yaml_ng::from_str(&read(ALERTS)).expect("the rules file is valid YAML")
}

/// Every document of a multi-document YAML file.
fn yaml_documents(text: &str) -> Vec<Yaml> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| Yaml::deserialize(document).expect("valid YAML document"))
        .filter(|document| !document.is_null())
        .collect()
}

fn yaml_str<'a>(value: &'a Yaml, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Yaml::as_str)
}

fn yaml_seq<'a>(value: &'a Yaml, key: &str) -> &'a [Yaml] {
    value
        .get(key)
        .and_then(Yaml::as_sequence)
        .map_or(&[], Vec::as_slice)
}

// ---------------------------------------------------------------------------
// The proxy's exposition and the metric names used in expressions.

/// One metric family as the proxy renders it.
#[derive(Debug)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
}

/// The families of the proxy's `/metrics`, every labelled one touched so
/// that it renders with its labels.
fn exposition() -> BTreeMap<String, Family> {
    let metrics = Metrics::new();
    metrics.requests.with_label_values(&["s", "ok"]).inc();
    metrics
        .upstream_calls
        .with_label_values(&["s", "rest", "ok"])
        .inc();
    metrics.queue_wait.with_label_values(&["s"]).observe(0.01);
    metrics
        .upstream_duration
        .with_label_values(&["s", "rest"])
        .observe(0.1);
    metrics.queue_depth.with_label_values(&["s"]).set(0);
    metrics.daily_used.with_label_values(&["s"]).set(1);
    metrics.token_refreshes.with_label_values(&["ok"]).inc();
    metrics.replays.with_label_values(&["606"]).inc();
    metrics.calls_saved.with_label_values(&["s", "coalesced"]).inc();
    metrics.queued.with_label_values(&["s"]).inc();
    metrics.observed.with_label_values(&["s", "would_wait"]).inc();
    metrics.bulk_jobs.with_label_values(&["leads", "queued"]).set(1);
    metrics.bulk_export_bytes.with_label_values(&["s"]).inc();
    metrics
        .backend_script_errors
        .with_label_values(&["acquire"])
        .inc();
    metrics.uncounted.with_label_values(&["s", "608"]).inc();
    parse_exposition(&metrics.render())
}

/// Family names and types from `# TYPE` lines; label names from the
/// samples that follow them.
fn parse_exposition(text: &str) -> BTreeMap<String, Family> {
    let mut families = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let name = words.next().expect("a family name").to_owned();
            let kind = words.next().expect("a family type").to_owned();
            families.insert(
                name.clone(),
                Family {
                    kind,
                    labels: BTreeSet::new(),
                },
            );
            current = Some(name);
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let family = current.as_ref().expect("a sample after its # TYPE line");
            assert!(
                line.starts_with(family.as_str()),
                "sample {line:?} outside {family}"
            );
            if let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) {
                let labels = &mut families.get_mut(family).expect("family").labels;
                for pair in line[open + 1..close].split(',').filter(|pair| !pair.is_empty()) {
                    let name = pair.split('=').next().expect("a label name");
                    labels.insert(name.to_owned());
                }
            }
        }
    }
    families
}

fn is_ident_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b':'
}

/// The prefixes of the families the proxy exports: its own, and the
/// process collector's standard ones.
const METRIC_PREFIXES: &[&str] = &["marketo_proxy_", "process_"];

/// Identifiers starting with one of [`METRIC_PREFIXES`], with their byte
/// offsets, in order.
fn metric_names(text: &str) -> Vec<(usize, &str)> {
    let bytes = text.as_bytes();
    let mut names = Vec::new();
    for prefix in METRIC_PREFIXES {
        let mut from = 0;
        while let Some(found) = text[from..].find(prefix) {
            let start = from + found;
            let mut end = start;
            while end < bytes.len() && is_ident_byte(bytes[end]) {
                end += 1;
            }
            if start == 0 || !is_ident_byte(bytes[start - 1]) {
                // A colon may end a sentence in prose ("marketo_proxy_inflight: ...").
                names.push((start, text[start..end].trim_end_matches(':')));
            }
            from = end;
        }
    }
    names.sort_unstable();
    names
}

/// The family a series name belongs to: itself, or a histogram's
/// `_bucket`/`_sum`/`_count` series.
fn family_of<'a>(families: &BTreeMap<String, Family>, name: &'a str) -> Option<&'a str> {
    if families.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        name.strip_suffix(suffix).filter(|base| {
            families
                .get(*base)
                .is_some_and(|family| family.kind == "histogram")
        })
    })
}

/// The text between the bracket at `open` and its partner, skipping
/// quoted strings; `None` when unbalanced.
fn enclosed(text: &str, open: usize) -> Option<&str> {
    let bytes = text.as_bytes();
    let (opening, closing) = match bytes[open] {
        b'{' => (b'{', b'}'),
        b'(' => (b'(', b')'),
        b'[' => (b'[', b']'),
        _ => return None,
    };
    let mut depth = 0;
    let mut quote: Option<u8> = None;
    let mut index = open;
    while index < bytes.len() {
        let byte = bytes[index];
        match quote {
            Some(_) if byte == b'\\' => index += 1,
            Some(q) if byte == q => quote = None,
            Some(_) => {}
            None if byte == b'"' || byte == b'\'' || byte == b'`' => quote = Some(byte),
            None if byte == opening => depth += 1,
            None if byte == closing => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[open + 1..index]);
                }
            }
            None => {}
        }
        index += 1;
    }
    None
}

/// Splits label matchers at commas outside quotes.
fn matchers(selector: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut quote: Option<char> = None;
    let mut start = 0;
    let mut escaped = false;
    for (index, ch) in selector.char_indices() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if ch == '\\' => escaped = true,
            Some(q) if ch == q => quote = None,
            Some(_) => {}
            None if ch == '"' || ch == '\'' || ch == '`' => quote = Some(ch),
            None if ch == ',' => {
                parts.push(&selector[start..index]);
                start = index + 1;
            }
            None => {}
        }
    }
    parts.push(&selector[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect()
}

fn leading_ident(text: &str) -> &str {
    let end = text
        .bytes()
        .position(|byte| !is_ident_byte(byte))
        .unwrap_or(text.len());
    &text[..end]
}

/// Checks brackets balance outside quoted strings.
fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for ch in expr.chars() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if ch == '\\' => escaped = true,
            Some(q) if ch == q => quote = None,
            Some(_) => {}
            None => match ch {
                '"' | '\'' | '`' => quote = Some(ch),
                '(' | '[' | '{' => stack.push(ch),
                ')' | ']' | '}' => {
                    let expected = match ch {
                        ')' => '(',
                        ']' => '[',
                        _ => '{',
                    };
                    if stack.pop() != Some(expected) {
                        return false;
                    }
                }
                _ => {}
            },
        }
    }
    stack.is_empty() && quote.is_none()
}

/// What a file asks of the exposition.
#[derive(Default)]
struct Usage {
    /// Families used anywhere (expressions, descriptions, annotations).
    families: BTreeSet<String>,
    problems: Vec<String>,
}

impl Usage {
    /// Every `marketo_proxy_*` name in `text` must be an exported family
    /// (or a histogram's series).
    fn names(&mut self, families: &BTreeMap<String, Family>, place: &str, text: &str) {
        for (_, name) in metric_names(text) {
            match family_of(families, name) {
                Some(family) => {
                    self.families.insert(family.to_owned());
                }
                None => self
                    .problems
                    .push(format!("{place}: `{name}` is not a metric the proxy exports")),
            }
        }
    }

    /// In a PromQL expression, also: brackets balance, selectors filter
    /// only on the family's labels, and `by`/`without` group on labels
    /// that exist.
    fn expr(&mut self, families: &BTreeMap<String, Family>, place: &str, expr: &str) {
        self.names(families, place, expr);
        if !balanced(expr) {
            self.problems
                .push(format!("{place}: unbalanced brackets in `{expr}`"));
        }
        for (start, name) in metric_names(expr) {
            let Some(family) = family_of(families, name) else {
                continue;
            };
            let after = start + name.len();
            let rest = &expr[after..];
            let open = after + (rest.len() - rest.trim_start().len());
            if expr.as_bytes().get(open) != Some(&b'{') {
                continue;
            }
            let Some(selector) = enclosed(expr, open) else {
                self.problems
                    .push(format!("{place}: unclosed selector after `{name}`"));
                continue;
            };
            let labels = &families[family].labels;
            for matcher in matchers(selector) {
                let label = leading_ident(matcher);
                let known = labels.contains(label)
                    || TARGET_LABELS.contains(&label)
                    || (label == "le" && name.ends_with("_bucket"));
                if !known {
                    self.problems.push(format!(
                        "{place}: `{name}` has no label `{label}` (labels: {labels:?})"
                    ));
                }
            }
        }
        let all_labels: BTreeSet<&str> = families
            .values()
            .flat_map(|family| family.labels.iter().map(String::as_str))
            .chain(TARGET_LABELS.iter().copied())
            .chain(["le"])
            .collect();
        let bytes = expr.as_bytes();
        for keyword in ["by", "without"] {
            let mut from = 0;
            while let Some(found) = expr[from..].find(keyword) {
                let start = from + found;
                let end = start + keyword.len();
                from = end;
                let boundary = (start == 0 || !is_ident_byte(bytes[start - 1]))
                    && (end == bytes.len() || !is_ident_byte(bytes[end]));
                let rest = &expr[end..];
                let open = end + (rest.len() - rest.trim_start().len());
                if !boundary || bytes.get(open) != Some(&b'(') {
                    continue;
                }
                let Some(list) = enclosed(expr, open) else {
                    continue;
                };
                for label in list.split(',').map(str::trim).filter(|label| !label.is_empty()) {
                    if !all_labels.contains(label) {
                        self.problems.push(format!(
                            "{place}: `{keyword} ({list})` groups on unknown label `{label}`"
                        ));
                    }
                }
            }
        }
    }

    fn assert_clean(&self, file: &str) {
        assert!(
            self.problems.is_empty(),
            "{file} does not match the proxy's metrics:\n  {}",
            self.problems.join("\n  ")
        );
    }
}

/// Every string in a JSON document with its path.
fn json_strings<'a>(value: &'a Json, path: &str, out: &mut Vec<(String, &'a str)>) {
    match value {
        Json::String(text) => out.push((path.to_owned(), text)),
        Json::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                json_strings(item, &format!("{path}[{index}]"), out);
            }
        }
        Json::Object(map) => {
            for (key, item) in map {
                json_strings(item, &format!("{path}.{key}"), out);
            }
        }
        _ => {}
    }
}

/// Every string in a YAML document with its path.
fn yaml_strings<'a>(value: &'a Yaml, path: &str, out: &mut Vec<(String, &'a str)>) {
    match value {
        Yaml::String(text) => out.push((path.to_owned(), text)),
        Yaml::Sequence(items) => {
            for (index, item) in items.iter().enumerate() {
                yaml_strings(item, &format!("{path}[{index}]"), out);
            }
        }
        Yaml::Mapping(map) => {
            for (key, item) in map {
                let key = key.as_str().unwrap_or("?");
                yaml_strings(item, &format!("{path}.{key}"), out);
            }
        }
        Yaml::Tagged(tagged) => yaml_strings(&tagged.value, path, out),
        _ => {}
    }
}

/// The dashboard's panels, rows' nested panels included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        all.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            all.extend(nested);
        }
    }
    all
}

fn panel_exprs(panel: &Json) -> Vec<&str> {
    panel["targets"]
        .as_array()
        .map(|targets| {
            targets
                .iter()
                .filter_map(|target| target["expr"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Grafana

#[test]
fn dashboard_uses_only_metrics_the_proxy_exports() {
    let families = exposition();
    assert!(
        families.len() >= 16,
        "the exposition lists every family: {families:?}"
    );
    let dashboard = dashboard();
    let mut usage = Usage::default();
    let mut strings = Vec::new();
    json_strings(&dashboard, "$", &mut strings);
    for (path, text) in &strings {
        if path.ends_with(".expr") || path.ends_with(".definition") || path.ends_with(".query.query") {
            usage.expr(&families, path, text);
        } else {
            usage.names(&families, path, text);
        }
    }
    usage.assert_clean(DASHBOARD);
    let unused: Vec<&String> = families
        .keys()
        .filter(|family| !usage.families.contains(*family))
        .collect();
    assert!(
        unused.is_empty(),
        "no panel of {DASHBOARD} shows {unused:?}: add one for each new metric"
    );
}

#[test]
fn dashboard_is_importable_and_complete() {
    let dashboard = dashboard();
    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(dashboard["uid"].as_str().is_some_and(|uid| !uid.is_empty()));
    assert!(dashboard["title"].as_str().is_some_and(|title| !title.is_empty()));

    // Template variables: a Prometheus data source picker and a multi-value
    // service selector; every $variable an expression uses is defined.
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|variable| variable["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let datasource = variable("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let service = variable("service");
    assert_eq!(service["type"], "query");
    assert_eq!(service["multi"], true);
    assert_eq!(service["includeAll"], true);
    let definition = service["definition"]
        .as_str()
        .expect("service variable definition");
    assert!(
        definition.starts_with("label_values(marketo_proxy_requests_total")
            && definition.ends_with(", service)"),
        "{definition}"
    );
    let defined: BTreeSet<&str> = variables
        .iter()
        .map(|variable| variable["name"].as_str().expect("variable name"))
        .collect();

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, u64, u64, u64, u64)> = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate id in {title}"
        );
        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|key| grid[key].as_u64().expect("gridPos"));
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {grid}");
        for (other, ox, oy, ow, oh) in &boxes {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(!overlap, "{title} overlaps {other}");
        }
        boxes.push((title.to_owned(), x, y, w, h));
        if panel["type"] == "row" {
            continue;
        }
        let description = panel["description"].as_str().unwrap_or_default();
        assert!(description.len() > 20, "{title}: no description");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            assert!(
                ref_ids.insert(target["refId"].as_str().expect("refId")),
                "{title}"
            );
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"].as_str().expect("expr");
            assert!(
                METRIC_PREFIXES.iter().any(|prefix| expr.contains(prefix)),
                "{title}: {expr}"
            );
            for (index, _) in expr.match_indices('$') {
                let name = leading_ident(&expr[index + 1..]);
                assert!(
                    name.starts_with("__") || defined.contains(name),
                    "{title}: ${name} is not a dashboard variable"
                );
            }
        }
    }

    // The concurrency panel shows Marketo's limit of 10 as a threshold.
    let inflight = panels(&dashboard)
        .into_iter()
        .find(|panel| {
            panel["type"] == "timeseries"
                && panel_exprs(panel)
                    .iter()
                    .any(|expr| expr.contains("marketo_proxy_inflight"))
        })
        .expect("a time series of calls in flight");
    let defaults = &inflight["fieldConfig"]["defaults"];
    assert!(
        defaults["thresholds"]["steps"]
            .as_array()
            .expect("threshold steps")
            .iter()
            .any(|step| step["value"] == 10),
        "{defaults}"
    );
    assert_ne!(defaults["custom"]["thresholdsStyle"]["mode"], "off");

    // The queries the brief names are there.
    let exprs: Vec<&str> = panels(&dashboard).into_iter().flat_map(panel_exprs).collect();
    for wanted in [
        "sum(increase(marketo_proxy_upstream_calls_total{",
        "marketo_proxy_queue_wait_seconds_bucket",
        "marketo_proxy_upstream_duration_seconds_bucket",
        "code!=\"ok\"",
    ] {
        assert!(
            exprs.iter().any(|expr| expr.contains(wanted)),
            "no query uses {wanted}"
        );
    }
    for quantile in ["histogram_quantile(0.5,", "histogram_quantile(0.99,"] {
        for histogram in ["queue_wait_seconds_bucket", "upstream_duration_seconds_bucket"] {
            assert!(
                exprs
                    .iter()
                    .any(|expr| expr.contains(quantile) && expr.contains(histogram)),
                "no {quantile} over {histogram}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Prometheus

fn rules(document: &Yaml) -> Vec<&Yaml> {
    yaml_seq(document, "groups")
        .iter()
        .flat_map(|group| yaml_seq(group, "rules"))
        .collect()
}

#[test]
fn alert_rules_use_only_metrics_the_proxy_exports() {
    let families = exposition();
    let document = alert_rules();
    let mut usage = Usage::default();
    let mut strings = Vec::new();
    yaml_strings(&document, "$", &mut strings);
    for (path, text) in &strings {
        if path.ends_with(".expr") {
            usage.expr(&families, path, text);
        } else {
            usage.names(&families, path, text);
        }
    }
    usage.assert_clean(ALERTS);
}

#[test]
fn alert_rules_are_complete() {
    let document = alert_rules();
    let groups = yaml_seq(&document, "groups");
    assert!(!groups.is_empty(), "no rule groups");
    let mut group_names = BTreeSet::new();
    for group in groups {
        let name = yaml_str(group, "name").expect("group name");
        assert!(group_names.insert(name), "duplicate group {name}");
    }
    let mut names = BTreeSet::new();
    for rule in rules(&document) {
        let name = yaml_str(rule, "alert").unwrap_or_else(|| panic!("not an alerting rule: {rule:?}"));
        assert!(names.insert(name), "duplicate alert {name}");
        let expr = yaml_str(rule, "expr").unwrap_or_default();
        assert!(!expr.trim().is_empty(), "{name}: no expr");
        assert!(balanced(expr), "{name}: unbalanced expr {expr}");
        let duration = yaml_str(rule, "for").unwrap_or_else(|| panic!("{name}: no `for`"));
        let unit = duration.trim_start_matches(|ch: char| ch.is_ascii_digit());
        assert!(
            unit.len() < duration.len() && ["s", "m", "h"].contains(&unit),
            "{name}: `for: {duration}`"
        );
        let severity = rule.get("labels").and_then(|labels| yaml_str(labels, "severity"));
        assert!(
            matches!(severity, Some("warning" | "critical")),
            "{name}: severity {severity:?}"
        );
        let annotations = rule
            .get("annotations")
            .unwrap_or_else(|| panic!("{name}: no annotations"));
        for key in ["summary", "description"] {
            let text = yaml_str(annotations, key).unwrap_or_default();
            assert!(!text.trim().is_empty(), "{name}: no {key}");
            assert_eq!(
                text.matches("{{").count(),
                text.matches("}}").count(),
                "{name}: unbalanced template in {key}"
            );
        }
    }
    let missing: Vec<&&str> = EXPECTED_ALERTS
        .iter()
        .filter(|name| !names.contains(**name))
        .collect();
    assert!(missing.is_empty(), "missing alerts {missing:?}; have {names:?}");

    let expr_of = |alert: &str| {
        rules(&document)
            .into_iter()
            .find(|rule| yaml_str(rule, "alert") == Some(alert))
            .and_then(|rule| yaml_str(rule, "expr"))
            .expect("alert present")
            .to_owned()
    };
    for alert in [
        "MarketoProxyDailyQuota80Percent",
        "MarketoProxyDailyQuota95Percent",
    ] {
        assert!(expr_of(alert).contains("marketo_proxy_daily_quota"), "{alert}");
    }
    assert!(expr_of("MarketoProxyDailyQuota80Percent").contains("0.8"));
    assert!(expr_of("MarketoProxyDailyQuota95Percent").contains("0.95"));
    let limited = expr_of("MarketoProxyUpstreamRateLimited") + &expr_of("MarketoProxyUpstreamQuotaExceeded");
    for code in ["606", "615", "607"] {
        assert!(limited.contains(code), "no alert on Marketo code {code}");
    }
    assert!(expr_of("MarketoProxyQueueWaitHigh").contains("histogram_quantile(0.99"));
    assert!(expr_of("MarketoProxyBackendDown").contains("marketo_proxy_backend_up == 0"));
}

#[test]
fn scrape_config_reads_the_admin_port_and_loads_the_rules() {
    let document: Yaml = serde_yaml_ng::from_str(&read(SCRAPE_CONFIG)).expect("valid YAML");
    let rule_files: Vec<&str> = yaml_seq(&document, "rule_files")
        .iter()
        .map(|file| file.as_str().expect("a rule file path"))
        .collect();
    assert!(rule_files.contains(&"alerts.yml"), "{rule_files:?}");
    for file in &rule_files {
        assert!(
            deploy_path("prometheus").join(file).is_file(),
            "{file} is not next to the config"
        );
    }

    let admin = Config::default().admin_listen.to_string();
    assert_eq!(admin, "127.0.0.1:9090", "the proxy's default admin listener");
    let job = yaml_seq(&document, "scrape_configs")
        .iter()
        .find(|job| {
            yaml_seq(job, "static_configs")
                .iter()
                .flat_map(|static_config| yaml_seq(static_config, "targets"))
                .any(|target| target.as_str() == Some(admin.as_str()))
        })
        .unwrap_or_else(|| panic!("no scrape job for {admin}"));
    assert_eq!(yaml_str(job, "metrics_path").unwrap_or("/metrics"), "/metrics");
    assert_eq!(yaml_str(job, "scheme").unwrap_or("http"), "http");

    // The proxy-down alert watches this job.
    let job_name = yaml_str(job, "job_name").expect("job_name");
    let rules_file = alert_rules();
    let down = rules(&rules_file)
        .into_iter()
        .find(|rule| yaml_str(rule, "alert") == Some("MarketoProxyDown"))
        .and_then(|rule| yaml_str(rule, "expr"))
        .expect("a MarketoProxyDown alert");
    assert!(down.contains(&format!("job=\"{job_name}\"")), "{down}");
}

// ---------------------------------------------------------------------------
// Kubernetes and the image

/// `ENTRYPOINT` of the Dockerfile, from its JSON (exec) form.
fn dockerfile_entrypoint(dockerfile: &str) -> Vec<String> {
    let line = dockerfile_instructions(dockerfile)
        .into_iter()
        .rev()
        .find(|line| line.starts_with("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    serde_json::from_str(line.trim_start_matches("ENTRYPOINT ")).expect("ENTRYPOINT in exec form")
}

/// The Dockerfile's instructions, continuation lines joined, comments out.
fn dockerfile_instructions(dockerfile: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => {
                current.push_str(start);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

fn find_kind<'a>(documents: &'a [Yaml], kind: &str) -> &'a Yaml {
    documents
        .iter()
        .find(|document| yaml_str(document, "kind") == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} in {SIDECAR}"))
}

/// The port a probe targets, by number or by the container's port name.
fn probe_port(container: &Yaml, probe: &str) -> (String, u64) {
    let get = container
        .get(probe)
        .and_then(|probe| probe.get("httpGet"))
        .unwrap_or_else(|| panic!("no {probe}.httpGet"));
    let path = yaml_str(get, "path").expect("probe path").to_owned();
    let port = match get.get("port").expect("probe port") {
        Yaml::Number(number) => number.as_u64().expect("port number"),
        Yaml::String(name) => yaml_seq(container, "ports")
            .iter()
            .find(|port| yaml_str(port, "name") == Some(name.as_str()))
            .and_then(|port| port.get("containerPort").and_then(Yaml::as_u64))
            .unwrap_or_else(|| panic!("{probe}: no container port named {name}")),
        other => panic!("{probe}: port {other:?}"),
    };
    (path, port)
}

/// `${NAME}` and `${NAME:-default}` placeholders outside comments.
fn placeholders(config: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in config.lines() {
        let code = match line.find(" #") {
            Some(comment) => &line[..comment],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        for (index, _) in code.match_indices("${") {
            names.insert(leading_ident(&code[index + 2..]).to_owned());
        }
    }
    names
}

#[test]
fn kubernetes_sidecar_wires_ports_probes_config_and_secrets() {
    let documents = yaml_documents(&read(SIDECAR));
    let config_map = find_kind(&documents, "ConfigMap");
    let deployment = find_kind(&documents, "Deployment");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    let containers: Vec<&Yaml> = yaml_seq(spec, "initContainers")
        .iter()
        .chain(yaml_seq(spec, "containers"))
        .collect();
    let proxy = containers
        .iter()
        .find(|container| yaml_str(container, "name") == Some("marketo-proxy"))
        .expect("a marketo-proxy container");

    let ports: BTreeSet<u64> = yaml_seq(proxy, "ports")
        .iter()
        .filter_map(|port| port.get("containerPort").and_then(Yaml::as_u64))
        .collect();
    assert_eq!(ports, BTreeSet::from([8080, 9090]));
    assert_eq!(probe_port(proxy, "readinessProbe"), ("/readyz".to_owned(), 9090));
    assert_eq!(probe_port(proxy, "livenessProbe"), ("/healthz".to_owned(), 9090));
    assert_eq!(
        yaml_str(&pod["metadata"]["annotations"], "prometheus.io/port"),
        Some("9090")
    );

    // Secrets reach the proxy as environment variables, and the config
    // names every one it uses.
    let env: BTreeMap<&str, &Yaml> = yaml_seq(proxy, "env")
        .iter()
        .map(|var| (yaml_str(var, "name").expect("env name"), var))
        .collect();
    let config_text = yaml_str(&config_map["data"], "config.yaml").expect("config.yaml in the ConfigMap");
    let needed = placeholders(config_text);
    assert!(
        !needed.is_empty(),
        "the config takes its secrets from ${{VAR}} placeholders"
    );
    for name in &needed {
        let var = env
            .get(name.as_str())
            .unwrap_or_else(|| panic!("${{{name}}} is not set in the sidecar"));
        assert!(
            var.get("valueFrom")
                .and_then(|from| from.get("secretKeyRef"))
                .is_some(),
            "{name} does not come from a Secret"
        );
    }

    // The config is one the proxy accepts, listening where the manifest says.
    let config = Config::from_yaml_with_env(config_text, |name| {
        needed.contains(name).then(|| {
            if name.contains("REDIS") {
                "redis://:password@redis:6379".to_owned()
            } else {
                format!("{}-example-0123456789abcdef", name.to_lowercase())
            }
        })
    })
    .unwrap_or_else(|error| panic!("the ConfigMap's config is invalid: {error}"));
    assert_eq!(config.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(config.admin_listen.port(), 9090);
    assert!(
        config.admin_listen.ip().is_unspecified(),
        "probes and Prometheus reach the admin listener on the pod IP"
    );

    // The image's entrypoint reads the config where the ConfigMap is mounted.
    let entrypoint = dockerfile_entrypoint(&read(DOCKERFILE));
    let config_flag = entrypoint
        .iter()
        .position(|arg| arg == "--config")
        .expect("--config");
    let config_path = Path::new(&entrypoint[config_flag + 1]);
    let volume = yaml_seq(spec, "volumes")
        .iter()
        .find(|volume| {
            volume.get("configMap").and_then(|map| yaml_str(map, "name"))
                == config_map["metadata"].get("name").and_then(Yaml::as_str)
        })
        .and_then(|volume| yaml_str(volume, "name"))
        .expect("a volume from the ConfigMap");
    let mount = yaml_seq(proxy, "volumeMounts")
        .iter()
        .find(|mount| yaml_str(mount, "name") == Some(volume))
        .and_then(|mount| yaml_str(mount, "mountPath"))
        .expect("the ConfigMap volume is mounted");
    assert_eq!(Path::new(mount).join("config.yaml"), config_path);

    // The integration reaches the proxy on the pod's loopback.
    let reaches_proxy = containers
        .iter()
        .filter(|container| yaml_str(container, "name") != Some("marketo-proxy"))
        .flat_map(|container| yaml_seq(container, "env"))
        .any(|var| yaml_str(var, "value") == Some("http://127.0.0.1:8080"));
    assert!(reaches_proxy, "no container points at http://127.0.0.1:8080");
}

#[test]
fn sidecar_arguments_parse_after_the_image_entrypoint() {
    let entrypoint = dockerfile_entrypoint(&read(DOCKERFILE));
    let documents = yaml_documents(&read(SIDECAR));
    let spec = &find_kind(&documents, "Deployment")["spec"]["template"]["spec"];
    let proxy = yaml_seq(spec, "initContainers")
        .iter()
        .chain(yaml_seq(spec, "containers"))
        .find(|container| yaml_str(container, "name") == Some("marketo-proxy"))
        .expect("a marketo-proxy container");
    assert!(
        proxy.get("command").is_none(),
        "the manifest keeps the image's entrypoint"
    );
    let args: Vec<&str> = yaml_seq(proxy, "args")
        .iter()
        .map(|arg| arg.as_str().expect("string args"))
        .collect();
    assert_eq!(entrypoint[0], "marketo-proxy");
    // A config that does not exist: the command line parses (a usage error
    // would exit 2) and the proxy stops at the config with exit 64.
    let missing = std::env::temp_dir().join("marketo-proxy-deploy-test-missing/config.yaml");
    let mut command_line: Vec<String> = entrypoint[1..].to_vec();
    let config_flag = command_line
        .iter()
        .position(|arg| arg == "--config")
        .expect("--config");
    command_line[config_flag + 1] = missing.display().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_marketo-proxy"))
        .args(&command_line)
        .args(&args)
        .env_remove("MARKETO_PROXY_CONFIG")
        .output()
        .expect("the proxy binary runs");
    assert_eq!(
        output.status.code(),
        Some(64),
        "{command_line:?} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn dockerfile_builds_a_non_root_image_with_both_ports() {
    let dockerfile = read(DOCKERFILE);
    let instructions = dockerfile_instructions(&dockerfile);
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert!(
        froms
            .first()
            .is_some_and(|from| from.starts_with("FROM rust:1-bookworm ")),
        "{froms:?}"
    );
    assert_eq!(
        froms.last().map(|from| from.as_str()),
        Some("FROM debian:bookworm-slim")
    );
    assert!(dockerfile.contains("ca-certificates"));

    let exposed: BTreeSet<&str> = instructions
        .iter()
        .filter_map(|line| line.strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .collect();
    assert_eq!(exposed, BTreeSet::from(["8080", "9090"]));

    let user = instructions
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("a USER");
    let name = user.split(':').next().unwrap_or_default();
    assert!(name != "root" && name != "0", "runs as {user}");

    assert_eq!(
        dockerfile_entrypoint(&dockerfile),
        [
            "marketo-proxy",
            "serve",
            "--config",
            "/etc/marketo-proxy/config.yaml"
        ]
    );

    // What the builder copies exists in the repository (the build context).
    for line in instructions.iter().filter(|line| line.starts_with("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        if words.iter().any(|word| word.starts_with("--from")) {
            continue;
        }
        let sources = &words[..words.len() - 1];
        for source in sources.iter().filter(|word| !word.starts_with("--")) {
            assert!(
                repo_root().join(source).exists(),
                "COPY {source}: not in the repository"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Configs run through the proxy binary

/// `${NAME}` placeholders of `config` with a made-up value each (a Redis
/// URL for Redis ones, an https URL for URLs).
fn example_values(names: &BTreeSet<String>) -> BTreeMap<String, String> {
    names
        .iter()
        .map(|name| {
            let value = if name.contains("REDIS") {
                "redis://:password@redis:6379".to_owned()
            } else if name.ends_with("_URL") {
                "https://123-ABC-456.mktorest.com".to_owned()
            } else {
                format!("{}-example-0123456789abcdef", name.to_lowercase())
            };
            (name.clone(), value)
        })
        .collect()
}

/// Runs `marketo-proxy check-config` on `config` (YAML text) with exactly
/// `env` as its environment; panics with its output unless it exits 0.
/// Returns the config as the proxy reads it with that environment.
fn check_config(place: &str, config: &str, env: &BTreeMap<String, String>) -> Config {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("config.yaml");
    fs::write(&file, config).expect("config written");
    let output = Command::new(env!("CARGO_BIN_EXE_marketo-proxy"))
        .arg("check-config")
        .arg(&file)
        .env_clear()
        .envs(env)
        .output()
        .expect("the proxy binary runs");
    assert!(
        output.status.success(),
        "{place}: check-config exited {:?}: {}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Config::from_yaml_with_env(config, |name| env.get(name).cloned())
        .unwrap_or_else(|error| panic!("{place}: {error}"))
}

/// `program` when it is on `PATH`; otherwise prints why the calling test
/// checks less and returns `None`.
fn on_path_or_skip(program: &str, how_to_get: &str, what: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        eprintln!("skipped {what}: `{program}` is not on PATH ({how_to_get})");
    }
    found
}

// ---------------------------------------------------------------------------
// The compose stack

const COMPOSE: &str = "compose.yaml";

fn compose() -> Yaml {
    let mut document: Yaml = serde_yaml_ng::from_str(&read(COMPOSE)).expect("compose.yaml is valid YAML");
    document.apply_merge().expect("merge keys resolve");
    document
}

fn compose_service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("no service {name} in {COMPOSE}"))
}

/// A service's `environment`, as a mapping or a list of `NAME=value`.
fn compose_env(service: &Yaml) -> BTreeMap<String, String> {
    match service.get("environment") {
        Some(Yaml::Mapping(map)) => map
            .iter()
            .map(|(name, value)| {
                let value = match value {
                    Yaml::String(text) => text.clone(),
                    other => serde_yaml_ng::to_string(other).expect("scalar").trim().to_owned(),
                };
                (name.as_str().expect("variable name").to_owned(), value)
            })
            .collect(),
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(|item| {
                let (name, value) = item
                    .as_str()
                    .and_then(|item| item.split_once('='))
                    .expect("NAME=value");
                (name.to_owned(), value.to_owned())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A service's bind mounts: container path → file under `deploy/`.
fn compose_mounts(service: &Yaml) -> BTreeMap<String, PathBuf> {
    yaml_seq(service, "volumes")
        .iter()
        .map(|volume| {
            let spec = volume.as_str().expect("short volume syntax");
            let mut parts = spec.split(':');
            let source = parts.next().expect("source");
            let target = parts.next().expect("target");
            assert!(
                source.starts_with("./"),
                "{spec}: a bind mount relative to deploy/"
            );
            let source = deploy_path(source.trim_start_matches("./"));
            assert!(source.exists(), "{spec}: {} does not exist", source.display());
            (target.to_owned(), source)
        })
        .collect()
}

/// The value of `--flag=value` or `--flag value` in an argument list.
fn flag_value(args: &[String], flag: &str) -> Vec<String> {
    let mut values = Vec::new();
    for (index, arg) in args.iter().enumerate() {
        if let Some(value) = arg.strip_prefix(&format!("{flag}=")) {
            values.push(value.to_owned());
        } else if arg == flag {
            values.extend(args.get(index + 1).cloned());
        }
    }
    values
}

fn string_list(value: Option<&Yaml>) -> Vec<String> {
    value
        .and_then(Yaml::as_sequence)
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_stack_wires_simulator_proxy_prometheus_and_grafana() {
    let compose = compose();
    let services: BTreeSet<&str> = compose["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .map(|name| name.as_str().expect("service name"))
        .collect();
    assert_eq!(
        services,
        BTreeSet::from(["sim", "redis", "proxy", "prometheus", "grafana", "load"])
    );

    // The proxy and the simulator are the image of deploy/Dockerfile.
    let entrypoint = dockerfile_entrypoint(&read(DOCKERFILE));
    for name in ["sim", "proxy"] {
        let build = &compose_service(&compose, name)["build"];
        let context = deploy_path(yaml_str(build, "context").expect("build context"));
        let dockerfile = context.join(yaml_str(build, "dockerfile").expect("dockerfile"));
        assert_eq!(
            dockerfile.canonicalize().unwrap(),
            deploy_path(DOCKERFILE).canonicalize().unwrap(),
            "{name}"
        );
    }
    let dockerfile = read(DOCKERFILE);
    assert!(
        dockerfile.contains("--bin marketo-sim") && dockerfile.contains("/usr/local/bin/marketo-sim"),
        "the image carries the simulator"
    );

    // The simulator knows the API users the proxy calls as.
    let sim = compose_service(&compose, "sim");
    let sim_args = string_list(sim.get("entrypoint"));
    assert_eq!(sim_args[0], "marketo-sim");
    let sim_listen: SocketAddr = flag_value(&sim_args, "--listen")[0].parse().expect("--listen");
    let sim_clients = flag_value(&sim_args, "--client");

    // The proxy's config, run through check-config with the stack's
    // environment; it is mounted where the image's entrypoint reads it.
    let proxy = compose_service(&compose, "proxy");
    let env = compose_env(proxy);
    let config_path = &entrypoint[entrypoint.iter().position(|arg| arg == "--config").unwrap() + 1];
    let mounts = compose_mounts(proxy);
    let config_file = mounts
        .get(config_path)
        .unwrap_or_else(|| panic!("nothing mounted at {config_path}"));
    let config_text = fs::read_to_string(config_file).unwrap();
    let needed = placeholders(&config_text);
    let unset: Vec<&String> = needed.iter().filter(|name| !env.contains_key(*name)).collect();
    assert!(unset.is_empty(), "the proxy service does not set {unset:?}");
    let config = check_config("compose/proxy.yaml", &config_text, &env);
    assert_eq!(config.marketo.base_url.host(), "sim");
    assert_eq!(
        config.marketo.base_url.authority(),
        format!("sim:{}", sim_listen.port())
    );
    assert!(config.listen.ip().is_unspecified() && config.admin_listen.ip().is_unspecified());
    let published: BTreeSet<String> = string_list(proxy.get("ports")).into_iter().collect();
    assert_eq!(
        published,
        BTreeSet::from([
            format!("127.0.0.1:{0}:{0}", config.listen.port()),
            format!("127.0.0.1:{0}:{0}", config.admin_listen.port()),
        ])
    );
    let mut upstream_users = vec![(
        config.marketo.client_id.clone(),
        config.marketo.client_secret.expose().to_owned(),
    )];
    for service in &config.services {
        if let Some(own) = &service.marketo {
            upstream_users.push((own.client_id.clone(), own.client_secret.expose().to_owned()));
        }
    }
    for (id, secret) in &upstream_users {
        assert!(
            sim_clients
                .iter()
                .any(|client| client.starts_with(&format!("{id}:{secret}:"))),
            "the simulator does not know the API user {id}: {sim_clients:?}"
        );
    }
    // Limits through the stack's Redis.
    assert!(matches!(
        config.state.backend,
        marketo_proxy::config::Backend::Redis
    ));
    let redis_url = config
        .state
        .redis
        .as_ref()
        .expect("redis settings")
        .url
        .expose()
        .to_owned();
    assert!(redis_url.starts_with("redis://redis:6379"), "state.redis.url");
    let depends = &proxy["depends_on"];
    for needed in ["sim", "redis"] {
        assert!(
            depends.get(needed).is_some(),
            "the proxy does not wait for {needed}"
        );
    }

    // The load generator calls the proxy with the services' keys.
    let load = compose_service(&compose, "load");
    let load_env = compose_env(load);
    assert_eq!(
        load_env["PROXY"],
        format!("http://proxy:{}", config.listen.port())
    );
    assert_eq!(
        load_env["ADMIN"],
        format!("http://proxy:{}", config.admin_listen.port())
    );
    assert_eq!(load_env["SIM"], format!("http://sim:{}", sim_listen.port()));
    let keys: BTreeSet<String> = config
        .services
        .iter()
        .filter_map(|service| service.api_key.as_ref().map(|key| key.expose().to_owned()))
        .collect();
    for variable in ["CRM_SYNC_KEY", "WAREHOUSE_KEY"] {
        assert!(
            keys.contains(&load_env[variable]),
            "{variable} is not a service's key"
        );
    }
    let load_mounts = compose_mounts(load);
    let script = &load_mounts[load_mounts.keys().next().expect("the script is mounted")];
    let script_text = fs::read_to_string(script).unwrap();
    for variable in ["PROXY", "ADMIN", "SIM", "CRM_SYNC_KEY", "WAREHOUSE_KEY"] {
        assert!(
            script_text.contains(&format!("${variable}")),
            "load.sh does not use ${variable}"
        );
    }
    assert!(script_text.contains("/readyz") && script_text.contains("/_sim/faults"));

    // Prometheus: the stack's scrape config is the shipped one aimed at the
    // proxy's container, with the shipped rules next to it.
    let prometheus = compose_service(&compose, "prometheus");
    let prometheus_args = string_list(prometheus.get("command"));
    let config_target = &flag_value(&prometheus_args, "--config.file")[0];
    let prometheus_mounts = compose_mounts(prometheus);
    let scrape: Yaml =
        serde_yaml_ng::from_str(&fs::read_to_string(&prometheus_mounts[config_target]).unwrap())
            .expect("valid YAML");
    let shipped: Yaml = serde_yaml_ng::from_str(&read(SCRAPE_CONFIG)).expect("valid YAML");
    for file in yaml_seq(&scrape, "rule_files") {
        let in_container = Path::new(config_target).with_file_name(file.as_str().expect("path"));
        let source = &prometheus_mounts[in_container.to_str().unwrap()];
        assert_eq!(
            source.canonicalize().unwrap(),
            deploy_path(ALERTS).canonicalize().unwrap()
        );
    }
    let mut job = yaml_seq(&scrape, "scrape_configs")[0].clone();
    let targets = string_list(job["static_configs"][0].get("targets"));
    assert_eq!(targets, [format!("proxy:{}", config.admin_listen.port())]);
    let mut shipped_job = yaml_seq(&shipped, "scrape_configs")[0].clone();
    job["static_configs"] = Yaml::Null;
    shipped_job["static_configs"] = Yaml::Null;
    assert_eq!(job, shipped_job, "the stack scrapes as the shipped config does");
    let prometheus_listen = flag_value(&prometheus_args, "--web.listen-address")[0].clone();
    let prometheus_port = prometheus_listen.rsplit(':').next().unwrap();

    // Grafana: the data source is the stack's Prometheus, and the dashboard
    // file is where the provider looks.
    let grafana = compose_service(&compose, "grafana");
    let grafana_mounts = compose_mounts(grafana);
    let provisioning = &grafana_mounts["/etc/grafana/provisioning"];
    let datasources: Yaml = serde_yaml_ng::from_str(
        &fs::read_to_string(provisioning.join("datasources/prometheus.yaml")).unwrap(),
    )
    .unwrap();
    let datasource = &yaml_seq(&datasources, "datasources")[0];
    assert_eq!(yaml_str(datasource, "type"), Some("prometheus"));
    assert_eq!(
        yaml_str(datasource, "url"),
        Some(format!("http://prometheus:{prometheus_port}").as_str())
    );
    assert_eq!(datasource["isDefault"], Yaml::Bool(true));
    let providers: Yaml = serde_yaml_ng::from_str(
        &fs::read_to_string(provisioning.join("dashboards/marketo-proxy.yaml")).unwrap(),
    )
    .unwrap();
    let folder = yaml_str(&yaml_seq(&providers, "providers")[0]["options"], "path").expect("provider path");
    let (dashboard_target, _) = grafana_mounts
        .iter()
        .find(|(_, source)| source.ends_with(DASHBOARD))
        .expect("the dashboard is mounted");
    assert_eq!(Path::new(dashboard_target).parent(), Some(Path::new(folder)));
    assert_eq!(
        compose_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"],
        *dashboard_target
    );
    let grafana_ports = string_list(grafana.get("ports"));
    assert_eq!(grafana_ports, ["127.0.0.1:3000:3000"]);

    // The README names the command and the Grafana URL.
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    assert!(readme.contains("docker compose -f deploy/compose.yaml up"));
    assert!(readme.contains("http://localhost:3000"));
}

#[test]
fn docker_compose_accepts_the_stack() {
    let Some(binary) = on_path_or_skip(
        "docker-compose",
        "Debian package `docker-compose`, which .ci/run installs",
        "`docker-compose config`",
    ) else {
        return;
    };
    let output = Command::new(binary)
        .args(["-f", "deploy/compose.yaml", "config", "--quiet"])
        .current_dir(repo_root())
        .output()
        .expect("docker-compose runs");
    assert!(
        output.status.success(),
        "docker-compose config: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------
// systemd

const UNIT: &str = "systemd/marketo-proxy.service";

/// `Key=value` settings of a unit file by section, in order; repeated keys
/// keep every value.
fn unit_settings(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut settings: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').expect("Key=value");
        settings
            .entry((section.clone(), key.trim().to_owned()))
            .or_default()
            .push(value.trim().to_owned());
    }
    settings
}

#[test]
fn systemd_unit_sandboxes_the_proxy_and_keeps_the_ledger_in_its_state_directory() {
    let settings = unit_settings(&read(UNIT));
    let service = |key: &str| -> &str {
        settings
            .get(&("Service".to_owned(), key.to_owned()))
            .and_then(|values| values.last())
            .unwrap_or_else(|| panic!("no {key}= in [Service]"))
    };
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("CapabilityBoundingSet", ""),
        ("KillSignal", "SIGTERM"),
        ("RestartPreventExitStatus", "64"),
    ] {
        assert_eq!(service(key), value, "{key}");
    }

    // serve --config FILE, with FILE in the configuration directory.
    let exec: Vec<&str> = service("ExecStart").split_whitespace().collect();
    assert_eq!(&exec[1..3], ["serve", "--config"]);
    let config_path = Path::new(exec[3]);
    assert_eq!(
        config_path.parent(),
        Some(
            Path::new("/etc")
                .join(service("ConfigurationDirectory"))
                .as_path()
        )
    );

    // The example config keeps the ledger in the state directory, the only
    // place ProtectSystem=strict lets the service write.
    let state_directory = Path::new("/var/lib").join(service("StateDirectory"));
    assert_eq!(Path::new(service("WorkingDirectory")), state_directory);
    let config_text = read("systemd/config.yaml");
    let env_file = read("systemd/marketo-proxy.env");
    let env_example: BTreeMap<String, String> = env_file
        .lines()
        .filter(|line| !line.trim_start().starts_with('#') && line.contains('='))
        .map(|line| {
            let (name, value) = line.split_once('=').unwrap();
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    let needed = placeholders(&config_text);
    let listed: BTreeSet<String> = env_example.keys().cloned().collect();
    assert_eq!(
        needed, listed,
        "the env file lists exactly the config's variables"
    );
    assert_eq!(
        Path::new(service("EnvironmentFile")).parent(),
        config_path.parent(),
        "the secrets sit next to the config"
    );
    // With the blanks filled in, the proxy accepts it.
    let mut env = example_values(&needed);
    env.extend(env_example.into_iter().filter(|(_, value)| !value.is_empty()));
    let config = check_config("systemd/config.yaml", &config_text, &env);
    let ledger = config.state.file.as_ref().expect("state.file is set");
    assert_eq!(ledger.parent(), Some(state_directory.as_path()), "state.file");
    assert!(matches!(
        config.state.backend,
        marketo_proxy::config::Backend::Memory
    ));
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let Some(binary) = on_path_or_skip(
        "systemd-analyze",
        "Debian package `systemd`",
        "`systemd-analyze verify`",
    ) else {
        return;
    };
    // verify checks that the commands exist: point them at the binary this
    // test was built with.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("marketo-proxy.service");
    let text = read(UNIT).replace(
        "/usr/local/bin/marketo-proxy",
        env!("CARGO_BIN_EXE_marketo-proxy"),
    );
    fs::write(&unit, text).unwrap();
    let output = Command::new(binary)
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Lines about other units (a host's own) are not this unit's problem.
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|line| line.contains("marketo-proxy.service"))
        .collect();
    assert!(
        output.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {said}"
    );
}

// ---------------------------------------------------------------------------
// Every Kubernetes manifest

const KUBERNETES_MANIFESTS: &[&str] = &["kubernetes/sidecar.yaml", "kubernetes/shared.yaml"];

fn labels_match(selector: &Yaml, labels: &Yaml) -> bool {
    selector.as_mapping().is_some_and(|wanted| {
        wanted
            .iter()
            .all(|(key, value)| labels.get(key.as_str().unwrap_or_default()) == Some(value))
    })
}

#[test]
fn kubernetes_manifests_agree_with_the_binary() {
    let listed: BTreeSet<String> = fs::read_dir(deploy_path("kubernetes"))
        .unwrap()
        .map(|entry| format!("kubernetes/{}", entry.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(
        listed,
        KUBERNETES_MANIFESTS
            .iter()
            .map(|name| (*name).to_owned())
            .collect(),
        "a manifest this test does not check"
    );
    let entrypoint = dockerfile_entrypoint(&read(DOCKERFILE));
    let config_path =
        Path::new(&entrypoint[entrypoint.iter().position(|arg| arg == "--config").unwrap() + 1]);
    for manifest in KUBERNETES_MANIFESTS {
        let documents = yaml_documents(&read(manifest));
        let mut proxies = 0;
        for deployment in documents
            .iter()
            .filter(|document| yaml_str(document, "kind") == Some("Deployment"))
        {
            let pod = &deployment["spec"]["template"];
            let spec = &pod["spec"];
            let Some(proxy) = yaml_seq(spec, "initContainers")
                .iter()
                .chain(yaml_seq(spec, "containers"))
                .find(|container| yaml_str(container, "name") == Some("marketo-proxy"))
            else {
                continue;
            };
            proxies += 1;
            let place = format!(
                "{manifest}: Deployment {}",
                deployment["metadata"]["name"].as_str().unwrap_or("?")
            );
            assert!(
                labels_match(
                    &deployment["spec"]["selector"]["matchLabels"],
                    &pod["metadata"]["labels"]
                ),
                "{place}: the selector does not match the pod"
            );

            // The config: the ConfigMap mounted where the image reads it.
            let mount = yaml_seq(proxy, "volumeMounts")
                .iter()
                .find(|mount| {
                    Path::new(yaml_str(mount, "mountPath").unwrap_or_default())
                        == config_path.parent().unwrap()
                })
                .unwrap_or_else(|| panic!("{place}: nothing mounted at {}", config_path.display()));
            let volume_name = yaml_str(mount, "name").unwrap();
            let config_map_name = yaml_seq(spec, "volumes")
                .iter()
                .find(|volume| yaml_str(volume, "name") == Some(volume_name))
                .and_then(|volume| volume.get("configMap"))
                .and_then(|map| yaml_str(map, "name"))
                .unwrap_or_else(|| panic!("{place}: volume {volume_name} is not a ConfigMap"));
            let config_map = documents
                .iter()
                .find(|document| {
                    yaml_str(document, "kind") == Some("ConfigMap")
                        && document["metadata"].get("name").and_then(Yaml::as_str) == Some(config_map_name)
                })
                .unwrap_or_else(|| panic!("{place}: no ConfigMap {config_map_name}"));
            let config_text = yaml_str(&config_map["data"], "config.yaml").expect("config.yaml");

            // Every variable the config uses comes from the container's
            // environment, secrets from a Secret.
            let env: BTreeMap<&str, &Yaml> = yaml_seq(proxy, "env")
                .iter()
                .map(|var| (yaml_str(var, "name").expect("env name"), var))
                .collect();
            let needed = placeholders(config_text);
            for name in &needed {
                let var = env
                    .get(name.as_str())
                    .unwrap_or_else(|| panic!("{place}: ${{{name}}} is not set"));
                assert!(
                    var.get("valueFrom")
                        .and_then(|from| from.get("secretKeyRef"))
                        .is_some(),
                    "{place}: {name} does not come from a Secret"
                );
            }
            let config = check_config(&place, config_text, &example_values(&needed));

            // Ports and probes match the listeners.
            let port_named = |name: &str| {
                yaml_seq(proxy, "ports")
                    .iter()
                    .find(|port| yaml_str(port, "name") == Some(name))
                    .and_then(|port| port.get("containerPort").and_then(Yaml::as_u64))
                    .unwrap_or_else(|| panic!("{place}: no port named {name}"))
            };
            assert_eq!(port_named("proxy"), u64::from(config.listen.port()), "{place}");
            assert_eq!(
                port_named("admin"),
                u64::from(config.admin_listen.port()),
                "{place}"
            );
            assert!(
                config.admin_listen.ip().is_unspecified(),
                "{place}: probes reach the pod IP"
            );
            let admin = u64::from(config.admin_listen.port());
            assert_eq!(
                probe_port(proxy, "readinessProbe"),
                ("/readyz".to_owned(), admin),
                "{place}"
            );
            assert_eq!(
                probe_port(proxy, "livenessProbe"),
                ("/healthz".to_owned(), admin),
                "{place}"
            );
            assert_eq!(
                probe_port(proxy, "startupProbe"),
                ("/healthz".to_owned(), admin),
                "{place}"
            );
            assert_eq!(
                yaml_str(&pod["metadata"]["annotations"], "prometheus.io/port"),
                Some(admin.to_string().as_str()),
                "{place}"
            );
            let context = &proxy["securityContext"];
            assert_eq!(context["readOnlyRootFilesystem"], Yaml::Bool(true), "{place}");
            assert_eq!(context["allowPrivilegeEscalation"], Yaml::Bool(false), "{place}");

            // Several replicas share the limits through Redis, and each
            // falls back to its share of them.
            let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
            if replicas > 1 {
                assert!(
                    matches!(config.state.backend, marketo_proxy::config::Backend::Redis),
                    "{place}"
                );
            }
            if let Some(redis) = &config.state.redis {
                assert!(
                    u64::from(redis.fallback_replicas.get()) >= replicas,
                    "{place}: fallback_replicas {} under {replicas} replicas",
                    redis.fallback_replicas
                );
                // A Redis this manifest runs is the one the config names.
                let url: url::Url = redis.url.expose().parse().expect("redis URL");
                if let Some(service) = documents.iter().find(|document| {
                    yaml_str(document, "kind") == Some("Service")
                        && document["metadata"].get("name").and_then(Yaml::as_str) == url.host_str()
                }) {
                    let ports: Vec<u64> = yaml_seq(&service["spec"], "ports")
                        .iter()
                        .filter_map(|port| port.get("port").and_then(Yaml::as_u64))
                        .collect();
                    assert_eq!(
                        ports,
                        [u64::from(url.port().unwrap_or(6379))],
                        "{place}: Redis port"
                    );
                }
            }

            // A Service in front of these pods reaches the proxy port, and
            // a disruption budget leaves one of them running.
            for service in documents.iter().filter(|document| {
                yaml_str(document, "kind") == Some("Service")
                    && labels_match(&document["spec"]["selector"], &pod["metadata"]["labels"])
            }) {
                for port in yaml_seq(&service["spec"], "ports") {
                    let target = match port.get("targetPort") {
                        Some(Yaml::String(name)) => port_named(name),
                        Some(Yaml::Number(number)) => number.as_u64().unwrap(),
                        _ => port["port"].as_u64().unwrap(),
                    };
                    assert_eq!(
                        target,
                        u64::from(config.listen.port()),
                        "{place}: Service port {port:?}"
                    );
                }
            }
            for budget in documents.iter().filter(|document| {
                yaml_str(document, "kind") == Some("PodDisruptionBudget")
                    && labels_match(
                        &document["spec"]["selector"]["matchLabels"],
                        &pod["metadata"]["labels"],
                    )
            }) {
                let min_available = budget["spec"]["minAvailable"].as_u64().expect("minAvailable");
                assert!(
                    (1..replicas).contains(&min_available),
                    "{place}: minAvailable {min_available}"
                );
            }
        }
        assert!(proxies > 0, "{manifest}: no Deployment runs marketo-proxy");
    }
}

#[test]
fn kubernetes_shared_deployment_runs_two_replicas_behind_a_service_with_a_disruption_budget() {
    let documents = yaml_documents(&read("kubernetes/shared.yaml"));
    let of_kind = |kind: &str| -> Vec<&Yaml> {
        documents
            .iter()
            .filter(|document| yaml_str(document, "kind") == Some(kind))
            .collect()
    };
    let proxy = of_kind("Deployment")
        .into_iter()
        .find(|deployment| deployment["metadata"]["name"] == "marketo-proxy")
        .expect("a marketo-proxy Deployment");
    assert_eq!(proxy["spec"]["replicas"].as_u64(), Some(2));
    let labels = &proxy["spec"]["template"]["metadata"]["labels"];
    let service = of_kind("Service")
        .into_iter()
        .find(|service| labels_match(&service["spec"]["selector"], labels))
        .expect("a Service for the proxy");
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(8080));
    // The replicas share auth.token_key: either one accepts a client's
    // token, so the Service needs no affinity.
    assert_eq!(yaml_str(&service["spec"], "sessionAffinity"), None);
    let config = yaml_documents(&read("kubernetes/shared.yaml"))
        .into_iter()
        .find(|document| yaml_str(document, "kind") == Some("ConfigMap"))
        .and_then(|map| map["data"]["config.yaml"].as_str().map(str::to_owned))
        .expect("the proxy's ConfigMap");
    assert!(config.contains("token_key: ${PROXY_TOKEN_KEY}"), "{config}");
    let budgets = of_kind("PodDisruptionBudget");
    assert_eq!(budgets.len(), 1);
    assert!(labels_match(
        &budgets[0]["spec"]["selector"]["matchLabels"],
        labels
    ));
    // Redis runs beside it, with a Service of its own.
    assert!(of_kind("Deployment").iter().any(|deployment| {
        yaml_seq(&deployment["spec"]["template"]["spec"], "containers")
            .iter()
            .any(|container| yaml_str(container, "image").is_some_and(|image| image.starts_with("redis:")))
    }));
}
