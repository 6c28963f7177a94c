//! Reading the previous plugin's result (`prevResult`): the pod's IPs; and
//! answering ADD with it in the request's version.

use std::net::IpAddr;

use serde_json::Value;

use crate::version;

/// The addresses in `ips[].address` ("10.0.0.5/24"), in order, deduplicated.
/// Every version we speak (0.3.0 to 1.1.0) has this shape.
pub fn ips(prev: &Value) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for entry in prev.get("ips").and_then(|v| v.as_array()).into_iter().flatten() {
        let Some(ip) = entry.get("address").and_then(|a| a.as_str()).and_then(address) else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

fn address(cidr: &str) -> Option<IpAddr> {
    cidr.split('/').next().unwrap_or(cidr).parse().ok()
}

/// The result to print for ADD: the previous result in the request's
/// version. A runtime hands every plugin of a list the previous plugin's
/// result in the list's version, so this normally only (re)sets
/// `cniVersion` and passes everything else through untouched. A prevResult
/// of the other shape is converted as libcni converts results: up to 0.4.0
/// each `ips[]` entry carries `version` ("4" or "6", required), from 1.0.0 on
/// it has none.
pub fn in_version(prev: &Value, cni_version: &str) -> Value {
    let mut out = prev.clone();
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    obj.insert("cniVersion".into(), cni_version.into());
    let versioned_ips = !version::at_least(cni_version, version::UNVERSIONED_IPS_SINCE);
    let entries = obj.get_mut("ips").and_then(Value::as_array_mut);
    for entry in entries.into_iter().flatten().filter_map(Value::as_object_mut) {
        if !versioned_ips {
            entry.remove("version");
            continue;
        }
        if entry.contains_key("version") {
            continue;
        }
        let family = entry
            .get("address")
            .and_then(Value::as_str)
            .and_then(address)
            .map(|ip| if ip.is_ipv4() { "4" } else { "6" });
        if let Some(family) = family {
            entry.insert("version".into(), family.into());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_ips_of_every_version() {
        let v1 = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"address": "10.222.0.5/24", "interface": 0, "gateway": "10.222.0.1"},
                    {"address": "fd00::5/64", "interface": 0}]});
        assert_eq!(
            ips(&v1),
            vec![
                "10.222.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let old = json!({"cniVersion": v, "ips": [{"version": "4", "address": "10.1.0.9/16"}]});
            assert_eq!(ips(&old), vec!["10.1.0.9".parse::<IpAddr>().unwrap()], "{v}");
        }
        assert!(ips(&json!({"cniVersion": "1.0.0"})).is_empty());
    }

    #[test]
    fn a_result_of_the_requests_version_passes_through_untouched() {
        let v11 = json!({"cniVersion": "1.1.0", "ips": [], "dns": {"nameservers": ["10.0.0.10"]}});
        assert_eq!(in_version(&v11, "1.1.0"), v11);
        // What bridge + host-local + portmap print for a 0.3.1 list (ptp's is the same shape).
        let v031 = json!({"cniVersion": "0.3.1",
            "interfaces": [{"name": "mbx0", "mac": "aa:bb:cc:dd:ee:01"},
                           {"name": "veth1", "mac": "aa:bb:cc:dd:ee:02"},
                           {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/p"}],
            "ips": [{"version": "4", "interface": 2, "address": "10.233.0.2/24", "gateway": "10.233.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {}});
        assert_eq!(in_version(&v031, "0.3.1"), v031);
        let mut v030 = v031.clone();
        v030["cniVersion"] = json!("0.3.0");
        assert_eq!(in_version(&v031, "0.3.0"), v030);
    }

    #[test]
    fn a_result_of_the_other_shape_is_converted() {
        let v1 = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.233.0.2/24", "interface": 0}, {"address": "fd00::2/64", "interface": 0}]});
        let old = in_version(&v1, "0.3.1");
        assert_eq!(
            old,
            json!({"cniVersion": "0.3.1", "interfaces": [{"name": "eth0"}],
                "ips": [{"version": "4", "address": "10.233.0.2/24", "interface": 0},
                        {"version": "6", "address": "fd00::2/64", "interface": 0}]})
        );
        let mut back = v1.clone();
        back["cniVersion"] = json!("1.1.0");
        assert_eq!(in_version(&old, "1.1.0"), back);
        // Not an object, or no ips: nothing to convert, nothing lost.
        assert_eq!(in_version(&json!([1]), "0.3.1"), json!([1]));
        assert_eq!(
            in_version(&json!({"cniVersion": "1.0.0", "dns": {}}), "0.4.0"),
            json!({"cniVersion": "0.4.0", "dns": {}})
        );
    }
}
