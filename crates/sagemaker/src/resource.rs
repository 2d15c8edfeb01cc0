//! resourceconfig.json: which host this container is and which hosts the job
//! has. The leader is `hosts[0]`, whatever it is called (SageMaker names hosts
//! `algo-1`, `algo-2`, ..., local mode `algo-1-abcde`; nothing here assumes a
//! name). Unknown fields are ignored and the instance-group fields of
//! heterogeneous clusters are optional, so new SageMaker fields never break a
//! job.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result, io_err};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ResourceConfig {
    pub current_host: String,
    pub hosts: Vec<String>,
    /// The interface the hosts reach each other on (NCCL_SOCKET_IFNAME).
    #[serde(default, deserialize_with = "lenient_string")]
    pub network_interface_name: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub current_instance_type: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub current_group_name: Option<String>,
    /// Heterogeneous clusters; informational only, so whatever cannot be read
    /// is left out rather than failing the job.
    #[serde(default, deserialize_with = "lenient_groups")]
    pub instance_groups: Vec<InstanceGroup>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceGroup {
    pub instance_group_name: Option<String>,
    pub instance_type: Option<String>,
    pub hosts: Vec<String>,
}

fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(v.as_str().map(str::to_string))
}

fn lenient_groups<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<InstanceGroup>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let text = |g: &serde_json::Value, k: &str| g.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let groups = v.as_array().map(Vec::as_slice).unwrap_or_default();
    Ok(groups
        .iter()
        .filter(|g| g.is_object())
        .map(|g| InstanceGroup {
            instance_group_name: text(g, "instance_group_name"),
            instance_type: text(g, "instance_type"),
            hosts: g
                .get("hosts")
                .and_then(|h| h.as_array())
                .map(|h| h.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
        })
        .collect())
}

impl ResourceConfig {
    /// One host, for a job without resourceconfig.json (SageMaker always writes
    /// one; hand-made test trees may not).
    pub fn single_host() -> Self {
        ResourceConfig {
            current_host: "localhost".into(),
            hosts: vec!["localhost".into()],
            network_interface_name: None,
            current_instance_type: None,
            current_group_name: None,
            instance_groups: Vec::new(),
        }
    }

    /// Reads the file; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    pub fn parse(text: &str, file: &str) -> Result<Self> {
        let err = |msg: String| Error::Settings { file: file.into(), msg };
        // serde_json's messages say what and where: "missing field `hosts` at line 1 column 2".
        let rc: ResourceConfig = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        if rc.hosts.is_empty() {
            return Err(err("hosts is empty: a job has at least one host".into()));
        }
        if let Some(h) = rc.hosts.iter().find(|h| h.trim().is_empty()) {
            return Err(err(format!("hosts contains an empty name ({h:?})")));
        }
        for (i, h) in rc.hosts.iter().enumerate() {
            if rc.hosts[..i].contains(h) {
                return Err(err(format!("hosts names {h} twice")));
            }
        }
        if !rc.hosts.contains(&rc.current_host) {
            return Err(err(format!(
                "current_host {:?} is not among hosts [{}]",
                rc.current_host,
                rc.hosts.join(", ")
            )));
        }
        Ok(rc)
    }

    /// hosts[0]: starts the job across all hosts and writes the outputs.
    pub fn leader(&self) -> &str {
        &self.hosts[0]
    }

    pub fn is_leader(&self) -> bool {
        self.current_host == self.hosts[0]
    }

    pub fn workers(&self) -> &[String] {
        &self.hosts[1..]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn two_hosts_with_instance_groups() {
        let text = r#"{
            "current_host": "algo-2",
            "current_instance_type": "ml.p4d.24xlarge",
            "current_group_name": "homogeneousCluster",
            "hosts": ["algo-1", "algo-2"],
            "instance_groups": [{"instance_group_name": "homogeneousCluster",
                                 "instance_type": "ml.p4d.24xlarge",
                                 "hosts": ["algo-2", "algo-1"]}],
            "network_interface_name": "eth0",
            "some_future_field": {"x": 1}
        }"#;
        let rc = ResourceConfig::parse(text, "rc.json").unwrap();
        assert_eq!(rc.leader(), "algo-1");
        assert!(!rc.is_leader());
        assert_eq!(rc.workers(), ["algo-2"]);
        assert_eq!(rc.network_interface_name.as_deref(), Some("eth0"));
        assert_eq!(rc.instance_groups[0].hosts, ["algo-2", "algo-1"]);
    }

    #[test]
    fn leader_is_the_first_host_whatever_its_name() {
        let text = r#"{"current_host": "algo-1-x7k2p", "hosts": ["algo-1-x7k2p", "algo-2-x7k2p"]}"#;
        let rc = ResourceConfig::parse(text, "rc.json").unwrap();
        assert!(rc.is_leader());
        assert_eq!(rc.leader(), "algo-1-x7k2p");
        assert_eq!(rc.network_interface_name, None);
        assert!(rc.instance_groups.is_empty());
    }

    #[test]
    fn odd_optional_fields_do_not_fail_the_job() {
        let text = r#"{"current_host": "b", "hosts": ["a", "b"], "network_interface_name": 7,
                       "instance_groups": [{"hosts": "not a list", "instance_type": 3}, 5,
                                           {"instance_group_name": "g", "hosts": ["a", 1, "b"]}]}"#;
        let rc = ResourceConfig::parse(text, "rc.json").unwrap();
        assert_eq!(rc.network_interface_name, None);
        assert_eq!(rc.instance_groups.len(), 2);
        assert_eq!(rc.instance_groups[0], InstanceGroup::default());
        assert_eq!(rc.instance_groups[1].hosts, ["a", "b"]);
    }

    #[test]
    fn errors_name_the_file_and_problem() {
        let cases = [
            (r#"{"hosts": ["a"]}"#, "current_host"),
            (r#"{"current_host": "a", "hosts": []}"#, "hosts is empty"),
            (r#"{"current_host": "c", "hosts": ["a", "b"]}"#, "not among hosts [a, b]"),
            (r#"{"current_host": "a", "hosts": ["a", "a"]}"#, "twice"),
            (r#"{"current_host": "a", "hosts": "a"}"#, "invalid type"),
            ("", "EOF"),
        ];
        for (text, needle) in cases {
            let e = ResourceConfig::parse(text, "rc.json").unwrap_err().to_string();
            assert!(e.starts_with("rc.json: ") && e.contains(needle), "{text}: {e}");
        }
    }
}
