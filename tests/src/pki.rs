//! A test PKI for TLS steal: a CA made with rcgen, the target's certificate
//! signed by it, and an impostor's self-signed certificate for the same names,
//! written as PEM files to a temporary directory.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};

/// The name the test certificates are for.
pub const HOST: &str = "api.graft.test";

/// A test CA, the target's certificate signed by it, and an impostor's
/// self-signed certificate for the same names, as PEM files in `dir`.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Makes the files; the certificates are for [`HOST`] and `ip` when given.
    ///
    /// # Panics
    ///
    /// When rcgen or the file system fails.
    pub fn new(ip: Option<std::net::Ipv4Addr>) -> Pki {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a certificate whose issuer is its own subject is
        // taken for self-signed.
        ca_params.distinguished_name = named("graft test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let mut names = vec![HOST.to_owned()];
        names.extend(ip.map(|ip| ip.to_string()));
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name = named(HOST);
        let cert = params.signed_by(&key, &ca).unwrap();
        let impostor_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = named("impostor");
        let impostor = params.self_signed(&impostor_key).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        write("server.crt", cert.pem());
        write("server.key", key.serialize_pem());
        write("impostor.crt", impostor.pem());
        write("impostor.key", impostor_key.serialize_pem());
        Pki { dir }
    }

    /// The path of `name`: `ca.pem`, `server.crt`, `server.key`, `impostor.crt`
    /// or `impostor.key`.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// A line from the middle of the server's private key (base64 of key bytes).
    pub fn key_line(&self) -> String {
        let pem = std::fs::read_to_string(self.path("server.key")).unwrap();
        pem.lines().nth(1).unwrap().to_owned()
    }
}

/// A distinguished name with only a common name.
fn named(cn: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    name
}
