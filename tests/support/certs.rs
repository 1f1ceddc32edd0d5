//! A throwaway mesh CA and SPIFFE certificates for the mTLS tests.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// PEM certificate and key.
pub struct Pem {
    /// Certificate chain.
    pub cert: String,
    /// Private key.
    pub key: String,
}

/// A CA that signs workload certificates.
pub struct Ca {
    /// The root certificate (PEM).
    pub root: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed root.
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "lazyload test mesh");
        let key = KeyPair::generate().unwrap();
        let root = params.self_signed(&key).unwrap().pem();
        Self {
            root,
            issuer: Issuer::new(params, key),
        }
    }

    /// A workload certificate for `spiffe://cluster.local/ns/<ns>/sa/<sa>` (and DNS names).
    pub fn workload(&self, ns: &str, sa: &str, dns: &[&str]) -> Pem {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        params.subject_alt_names.push(SanType::URI(
            format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
                .try_into()
                .unwrap(),
        ));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}
