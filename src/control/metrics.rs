//! `/metrics` in the Prometheus text exposition format (version 0.0.4): every family with its
//! `# HELP` and `# TYPE` lines, states as one gauge per possible value (1 for the current one).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::telemetry::{ProcessState, Role, SessionState, Telemetry};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const PROCESS_STATES: [(ProcessState, &str); 4] = [
    (ProcessState::Stopped, "stopped"),
    (ProcessState::Running, "running"),
    (ProcessState::Terminating, "terminating"),
    (ProcessState::Dead, "dead"),
];

const ROLES: [(Role, &str); 4] = [
    (Role::Follower, "follower"),
    (Role::Leader, "leader"),
    (Role::LeaderPending, "leader_pending"),
    (Role::LeaderConfiguring, "leader_configuring"),
];

const SESSION_STATES: [SessionState; 5] = [
    SessionState::Connecting,
    SessionState::Connected,
    SessionState::Disconnected,
    SessionState::Expired,
    SessionState::Closed,
];

/// Renders the metrics of one pod; `responses` counts HTTP replies by status code.
pub fn render(telemetry: &Telemetry, responses: &BTreeMap<u16, u64>) -> String {
    let facts = telemetry.facts();
    let mut text = String::new();

    family(
        &mut text,
        "ochopod_process_state",
        "gauge",
        "State of the sub-process (1 for the current state).",
    );
    for (state, name) in PROCESS_STATES {
        sample(
            &mut text,
            "ochopod_process_state",
            &[("state", name)],
            flag(facts.process == state),
        );
    }

    family(
        &mut text,
        "ochopod_leader",
        "gauge",
        "1 while this pod leads its cluster.",
    );
    sample(
        &mut text,
        "ochopod_leader",
        &[],
        flag(facts.role.is_leader()),
    );

    family(
        &mut text,
        "ochopod_role",
        "gauge",
        "Role of this pod in its cluster (1 for the current role).",
    );
    for (role, name) in ROLES {
        sample(
            &mut text,
            "ochopod_role",
            &[("role", name)],
            flag(facts.role == role),
        );
    }

    family(
        &mut text,
        "ochopod_leader_epoch",
        "gauge",
        "Highest leader epoch this pod has obeyed.",
    );
    sample(&mut text, "ochopod_leader_epoch", &[], facts.epoch as f64);

    family(
        &mut text,
        "ochopod_configuration_rounds_total",
        "counter",
        "Configuration rounds this pod completed as leader.",
    );
    sample(
        &mut text,
        "ochopod_configuration_rounds_total",
        &[],
        telemetry.rounds.load(Ordering::Relaxed) as f64,
    );

    family(
        &mut text,
        "ochopod_configuration_rounds_failed_total",
        "counter",
        "Configuration rounds this pod gave up as leader.",
    );
    sample(
        &mut text,
        "ochopod_configuration_rounds_failed_total",
        &[],
        telemetry.failed_rounds.load(Ordering::Relaxed) as f64,
    );

    family(
        &mut text,
        "ochopod_restarts_total",
        "counter",
        "Sub-process restarts since the agent started.",
    );
    sample(
        &mut text,
        "ochopod_restarts_total",
        &[],
        facts.restarts as f64,
    );

    family(
        &mut text,
        "ochopod_zookeeper_session_state",
        "gauge",
        "State of the ZooKeeper session (1 for the current state).",
    );
    for state in SESSION_STATES {
        sample(
            &mut text,
            "ochopod_zookeeper_session_state",
            &[("state", state.as_str())],
            flag(facts.session == state),
        );
    }

    family(
        &mut text,
        "ochopod_control_requests_total",
        "counter",
        "Control requests served, by outcome.",
    );
    let ok = telemetry.requests_ok.load(Ordering::Relaxed) as f64;
    let failed = telemetry.requests_failed.load(Ordering::Relaxed) as f64;
    sample(
        &mut text,
        "ochopod_control_requests_total",
        &[("outcome", "ok")],
        ok,
    );
    sample(
        &mut text,
        "ochopod_control_requests_total",
        &[("outcome", "failed")],
        failed,
    );

    family(
        &mut text,
        "ochopod_http_responses_total",
        "counter",
        "HTTP replies of the control server, by status code.",
    );
    for (code, count) in responses {
        sample(
            &mut text,
            "ochopod_http_responses_total",
            &[("code", &code.to_string())],
            *count as f64,
        );
    }

    family(
        &mut text,
        "ochopod_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
    );
    sample(&mut text, "ochopod_uptime_seconds", &[], telemetry.uptime());

    // Numbers (and booleans, as 0 or 1) at the top level of the last sanity check's metrics.
    family(
        &mut text,
        "ochopod_check_metric",
        "gauge",
        "Numeric metrics returned by the last sanity check, by name.",
    );
    if let Some(metrics) = facts.metrics.as_object() {
        for (name, value) in metrics {
            let number = match value {
                serde_json::Value::Number(number) => number.as_f64(),
                serde_json::Value::Bool(value) => Some(flag(*value)),
                _ => None,
            };
            if let Some(number) = number {
                sample(&mut text, "ochopod_check_metric", &[("name", name)], number);
            }
        }
    }
    text
}

fn flag(value: bool) -> f64 {
    if value {
        1.0
    } else {
        0.0
    }
}

fn family(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}");
    let _ = writeln!(text, "# TYPE {name} {kind}");
}

fn sample(text: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    text.push_str(name);
    if !labels.is_empty() {
        let labels: Vec<String> = labels
            .iter()
            .map(|(label, value)| format!("{label}=\"{}\"", escape_label(value)))
            .collect();
        let _ = write!(text, "{{{}}}", labels.join(","));
    }
    let _ = writeln!(text, " {value}");
}

/// Escapes a label value: backslash, double quote and line feed, as the format requires.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type() {
        let telemetry = Telemetry::default();
        telemetry.update(|facts| {
            facts.process = ProcessState::Running;
            facts.role = Role::LeaderPending;
            facts.metrics =
                serde_json::json!({"load": 0.5, "ready": true, "text": "x", "odd\"name": 2});
        });
        Telemetry::count(&telemetry.rounds);
        let text = render(&telemetry, &BTreeMap::from([(200, 3), (404, 1)]));

        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name}"
            );
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "invalid value in {line}");
        }
        assert!(text.contains("ochopod_process_state{state=\"running\"} 1\n"));
        assert!(text.contains("ochopod_process_state{state=\"dead\"} 0\n"));
        assert!(text.contains("ochopod_leader 1\n"));
        assert!(text.contains("ochopod_role{role=\"leader_pending\"} 1\n"));
        assert!(text.contains("ochopod_configuration_rounds_total 1\n"));
        assert!(text.contains("ochopod_zookeeper_session_state{state=\"connecting\"} 1\n"));
        assert!(text.contains("ochopod_http_responses_total{code=\"404\"} 1\n"));
        assert!(text.contains("ochopod_check_metric{name=\"load\"} 0.5\n"));
        assert!(text.contains("ochopod_check_metric{name=\"ready\"} 1\n"));
        assert!(text.contains("ochopod_check_metric{name=\"odd\\\"name\"} 2\n"));
        assert!(!text.contains("name=\"text\""));
    }
}
