//! Property tests of the parsers that read what an enclave sends before any policy decision:
//! the HTTP CONNECT head, the TLS ClientHello, and wildcard matching. None may panic on any
//! input, and every name they accept is one the allowlist names.

use nitro_vsock_proxy::config;
use nitro_vsock_proxy::connect::parse_head;
use nitro_vsock_proxy::host::{Host, HostName, HostPattern};
use nitro_vsock_proxy::policy::Policy;
use nitro_vsock_proxy::sni::server_name;
use proptest::prelude::*;

fn policy() -> Policy {
    let yaml = "allowlist:\n- {address: api.example.com, port: 443}\n- {address: '*.s3.example.com', port: 443}\n";
    Policy::new(
        config::parse(yaml, std::path::Path::new("p.yaml"))
            .unwrap()
            .allowlist,
    )
}

/// A name accepted for port 443 by the test allowlist, by hand.
fn named_by_allowlist(name: &str) -> bool {
    name == "api.example.com"
        || name
            .strip_suffix(".s3.example.com")
            .is_some_and(|head| !head.is_empty())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn connect_heads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_head(&bytes);
    }

    #[test]
    fn connect_targets_round_trip(host in "[a-zA-Z0-9.*{}\\[\\]:-]{0,40}", port in any::<u16>()) {
        let head = format!("CONNECT {host}:{port} HTTP/1.1\r\n\r\n");
        if let Ok(Some(request)) = parse_head(head.as_bytes()) {
            prop_assert_eq!(request.port, port);
            prop_assert!(port != 0);
            if let Host::Name(name) = &request.host {
                let odd = name.as_str().contains(['*', '{', '}', '[', ']', ':']);
                prop_assert!(!odd, "{}", name);
                let allowed = policy().admits_request(&request.host, port).is_ok();
                prop_assert_eq!(allowed, port == 443 && named_by_allowlist(name.as_str()));
            }
        }
    }

    #[test]
    fn client_hellos_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = server_name(&bytes);
        // Also behind a valid-looking handshake record header.
        let mut record = vec![22u8, 3, 1];
        record.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        record.extend_from_slice(&bytes);
        if let Ok(Some(name)) = server_name(&record) {
            prop_assert!(HostName::parse(name.as_str()).is_ok());
        }
    }

    #[test]
    fn wildcards_match_exactly_the_names_below_their_suffix(label in "[a-z0-9-]{1,10}", rest in "[a-z0-9.-]{0,20}") {
        let suffix = HostName::parse("s3.example.com").unwrap();
        let candidate = format!("{label}.{rest}");
        if let Ok(name) = HostName::parse(&candidate) {
            let by_hand = name.as_str().ends_with(".s3.example.com");
            prop_assert_eq!(name.matches_wildcard(&suffix), by_hand);
            prop_assert_eq!(
                policy().admits_request(&Host::Name(name.clone()), 443).is_ok(),
                named_by_allowlist(name.as_str())
            );
        }
        prop_assert!(!HostName::parse("s3.example.com").unwrap().matches_wildcard(&suffix));
        let pattern = format!("*.{rest}");
        if let Ok(HostPattern::Wildcard(s)) = pattern.parse::<HostPattern>() {
            prop_assert!(!s.as_str().contains('*'));
        }
    }
}
