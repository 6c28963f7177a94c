//! Reading the previous plugin's result (`prevResult`): the pod's IPs. The
//! result itself is passed back untouched.

use std::net::IpAddr;

/// The addresses in `ips[].address` ("10.0.0.5/24"), in order, deduplicated.
/// CNI 0.4.0 and 1.x share this shape.
pub fn ips(prev: &serde_json::Value) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for entry in prev.get("ips").and_then(|v| v.as_array()).into_iter().flatten() {
        let Some(addr) = entry.get("address").and_then(|a| a.as_str()) else {
            continue;
        };
        let ip = addr.split('/').next().unwrap_or(addr);
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// The result to print for ADD: the previous result as it came, with the
/// request's `cniVersion` (the runtime already converted it to that version).
pub fn passthrough(prev: &serde_json::Value, cni_version: &str) -> serde_json::Value {
    let mut out = prev.clone();
    if let Some(obj) = out.as_object_mut() {
        obj.insert("cniVersion".into(), cni_version.into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_ips_of_both_versions() {
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
        let v04 = json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.1.0.9/16"}]});
        assert_eq!(ips(&v04), vec!["10.1.0.9".parse::<IpAddr>().unwrap()]);
        assert!(ips(&json!({"cniVersion": "1.0.0"})).is_empty());
    }

    #[test]
    fn passthrough_keeps_everything_but_sets_the_version() {
        let prev = json!({"cniVersion": "1.1.0", "ips": [], "dns": {"nameservers": ["10.0.0.10"]}});
        let out = passthrough(&prev, "1.1.0");
        assert_eq!(out, prev);
    }
}
