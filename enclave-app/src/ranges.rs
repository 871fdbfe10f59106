//! AWS's `ip-ranges.json`, reduced to what the server answers: the S3 prefixes of each region.
//!
//! This module owns the document's format and nothing else (no I/O): [`RangesIndex::parse`]
//! reads the document (`prefixes[]` with `ip_prefix`, `region`, `service`, and the optional
//! `ipv6_prefixes[]` with `ipv6_prefix`), keeps the entries of service `S3` (not `S3_EXPRESS`
//! or any other), checks that each is a valid prefix of its family, and indexes them by region,
//! in document order without duplicates. [`RangesIndex::s3_prefixes`] answers a query: the
//! region is compared case-insensitively and an unknown region has no prefixes.

use std::collections::HashMap;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

/// The service whose prefixes are answered.
pub const SERVICE: &str = "S3";

#[derive(Deserialize)]
struct Document {
    prefixes: Vec<V4Entry>,
    #[serde(default)]
    ipv6_prefixes: Vec<V6Entry>,
}

#[derive(Deserialize)]
struct V4Entry {
    ip_prefix: String,
    region: String,
    service: String,
}

#[derive(Deserialize)]
struct V6Entry {
    ipv6_prefix: String,
    region: String,
    service: String,
}

/// The S3 prefixes of one region.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct RegionPrefixes {
    v4: Vec<String>,
    v6: Vec<String>,
}

/// The S3 prefixes of every region in one document.
#[derive(Debug, Default)]
pub struct RangesIndex {
    regions: HashMap<String, RegionPrefixes>,
}

impl RangesIndex {
    /// Parses a document. Errors say what is wrong and where (serde's line and column, or the
    /// entry's index), e.g. `prefixes[3].ip_prefix "3.5.0.0/99" is not an IPv4 prefix`.
    pub fn parse(document: &[u8]) -> Result<RangesIndex, String> {
        let doc: Document = serde_json::from_slice(document)
            .map_err(|e| format!("not an ip-ranges.json document: {e}"))?;
        let mut regions: HashMap<String, RegionPrefixes> = HashMap::new();
        for (i, entry) in doc.prefixes.iter().enumerate() {
            if !entry.service.eq_ignore_ascii_case(SERVICE) {
                continue;
            }
            if entry.ip_prefix.parse::<Ipv4Net>().is_err() {
                return Err(format!(
                    "prefixes[{i}].ip_prefix {:?} is not an IPv4 prefix",
                    entry.ip_prefix
                ));
            }
            let list = &mut regions
                .entry(entry.region.to_ascii_lowercase())
                .or_default()
                .v4;
            push_unique(list, &entry.ip_prefix);
        }
        for (i, entry) in doc.ipv6_prefixes.iter().enumerate() {
            if !entry.service.eq_ignore_ascii_case(SERVICE) {
                continue;
            }
            if entry.ipv6_prefix.parse::<Ipv6Net>().is_err() {
                return Err(format!(
                    "ipv6_prefixes[{i}].ipv6_prefix {:?} is not an IPv6 prefix",
                    entry.ipv6_prefix
                ));
            }
            let list = &mut regions
                .entry(entry.region.to_ascii_lowercase())
                .or_default()
                .v6;
            push_unique(list, &entry.ipv6_prefix);
        }
        Ok(RangesIndex { regions })
    }

    /// The S3 prefixes of `region` (case-insensitive): IPv4 in document order, then, with
    /// `ipv6`, IPv6 in document order. Empty for a region the document does not name.
    pub fn s3_prefixes(&self, region: &str, ipv6: bool) -> Vec<&str> {
        let Some(found) = self.regions.get(&region.to_ascii_lowercase()) else {
            return Vec::new();
        };
        let v6: &[String] = if ipv6 { &found.v6 } else { &[] };
        found.v4.iter().chain(v6).map(String::as_str).collect()
    }

    /// How many regions have S3 prefixes.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }
}

fn push_unique(list: &mut Vec<String>, prefix: &str) {
    if !list.iter().any(|p| p == prefix) {
        list.push(prefix.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = include_bytes!("../testdata/ip-ranges.sample.json");

    fn doc(v4: &[(&str, &str, &str)], v6: &[(&str, &str, &str)]) -> Vec<u8> {
        let v4: Vec<_> = v4
            .iter()
            .map(|(p, r, s)| serde_json::json!({"ip_prefix": p, "region": r, "service": s, "network_border_group": r}))
            .collect();
        let v6: Vec<_> = v6
            .iter()
            .map(|(p, r, s)| serde_json::json!({"ipv6_prefix": p, "region": r, "service": s, "network_border_group": r}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "syncToken": "1", "createDate": "2024-01-01-00-00-00",
            "prefixes": v4, "ipv6_prefixes": v6
        }))
        .unwrap()
    }

    #[test]
    fn keeps_s3_of_the_region_in_document_order() {
        let d = doc(
            &[
                ("52.216.0.0/15", "us-east-1", "S3"),
                ("3.5.0.0/19", "us-east-1", "AMAZON"),
                ("3.5.0.0/19", "us-east-1", "S3"),
                ("18.34.0.0/19", "us-east-1", "S3_EXPRESS"),
                ("3.5.64.0/21", "eu-west-1", "S3"),
                ("44.192.0.0/11", "us-east-1", "EC2"),
            ],
            &[],
        );
        let index = RangesIndex::parse(&d).unwrap();
        assert_eq!(
            index.s3_prefixes("us-east-1", false),
            ["52.216.0.0/15", "3.5.0.0/19"]
        );
        assert_eq!(index.s3_prefixes("eu-west-1", false), ["3.5.64.0/21"]);
        assert_eq!(index.region_count(), 2);
    }

    #[test]
    fn unknown_region_has_no_prefixes_and_case_does_not_matter() {
        let d = doc(&[("3.5.0.0/19", "us-east-1", "S3")], &[]);
        let index = RangesIndex::parse(&d).unwrap();
        assert!(index.s3_prefixes("mars-north-1", false).is_empty());
        assert!(index.s3_prefixes("", false).is_empty());
        assert_eq!(index.s3_prefixes("US-EAST-1", false), ["3.5.0.0/19"]);
    }

    #[test]
    fn ipv6_only_when_asked_and_after_ipv4() {
        let d = doc(
            &[("3.5.0.0/19", "us-east-1", "S3")],
            &[
                ("2600:1fa0:80::/39", "us-east-1", "S3"),
                ("2600:1f00::/24", "us-east-1", "AMAZON"),
                ("2a05:d07a:a000::/40", "eu-west-1", "S3"),
            ],
        );
        let index = RangesIndex::parse(&d).unwrap();
        assert_eq!(index.s3_prefixes("us-east-1", false), ["3.5.0.0/19"]);
        assert_eq!(
            index.s3_prefixes("us-east-1", true),
            ["3.5.0.0/19", "2600:1fa0:80::/39"]
        );
        assert!(index.s3_prefixes("eu-west-1", false).is_empty());
        assert_eq!(
            index.s3_prefixes("eu-west-1", true),
            ["2a05:d07a:a000::/40"]
        );
    }

    #[test]
    fn duplicates_are_answered_once() {
        let d = doc(
            &[
                ("3.5.0.0/19", "us-east-1", "S3"),
                ("3.5.0.0/19", "us-east-1", "S3"),
            ],
            &[],
        );
        let index = RangesIndex::parse(&d).unwrap();
        assert_eq!(index.s3_prefixes("us-east-1", false), ["3.5.0.0/19"]);
    }

    #[test]
    fn missing_ipv6_section_is_fine() {
        let index = RangesIndex::parse(
            br#"{"prefixes": [{"ip_prefix": "3.5.0.0/19", "region": "us-east-1", "service": "S3"}]}"#,
        )
        .unwrap();
        assert_eq!(index.s3_prefixes("us-east-1", true), ["3.5.0.0/19"]);
    }

    #[test]
    fn bad_documents_are_named() {
        let err = RangesIndex::parse(b"<html>").unwrap_err();
        assert!(err.contains("not an ip-ranges.json document"), "{err}");
        let err = RangesIndex::parse(b"{\"syncToken\": \"1\"}").unwrap_err();
        assert!(err.contains("missing field `prefixes`"), "{err}");
        let err = RangesIndex::parse(&doc(&[("3.5.0.0/99", "us-east-1", "S3")], &[])).unwrap_err();
        assert!(
            err.contains("prefixes[0].ip_prefix \"3.5.0.0/99\" is not an IPv4 prefix"),
            "{err}"
        );
        let err = RangesIndex::parse(&doc(&[], &[("3.5.0.0/19", "us-east-1", "S3")])).unwrap_err();
        assert!(err.contains("ipv6_prefixes[0]"), "{err}");
        // An invalid prefix of another service is not our business.
        assert!(RangesIndex::parse(&doc(&[("nonsense", "us-east-1", "EC2")], &[])).is_ok());
    }

    #[test]
    fn bundled_sample_parses() {
        let index = RangesIndex::parse(SAMPLE).unwrap();
        let east = index.s3_prefixes("us-east-1", false);
        assert!(east.len() >= 5, "{east:?}");
        assert!(east.iter().all(|p| p.parse::<Ipv4Net>().is_ok()));
        assert!(index.region_count() >= 3);
        assert!(index.s3_prefixes("us-east-1", true).len() > east.len());
    }
}
