//! Plugin signatures: ed25519 keys, signature files beside plugins, and the trust a process
//! gives to them.
//!
//! A signature covers the plugin's sha256, its described name and its version (the message
//! [`signed_message`] builds), so a signature cannot be moved to another plugin or to another
//! build of the same one. It lives beside the component as `FILE.wasm.sig`: one line of JSON
//! ([`SignatureFile`]) holding the signer's public key and key id, so a plugin can be checked
//! anywhere; whether that signer is *trusted* is the receiving side's decision ([`Trust`]: the
//! public keys it accepts, and whether an unsigned plugin may run at all).
//!
//! Key files are text: `espalier-ed25519-secret-key HEX` (created readable by the owner only)
//! and `espalier-ed25519-public-key HEX`; the key id is the first 16 hex digits of the
//! public key's sha256.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const SECRET_TAG: &str = "espalier-ed25519-secret-key";
const PUBLIC_TAG: &str = "espalier-ed25519-public-key";
/// `format` of every signature file.
pub const SIGNATURE_FORMAT: &str = "espalier-plugin-signature";
/// Largest signature or key file read.
const SMALL_FILE_LIMIT: u64 = 64 << 10;

/// Why a key or signature cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What happened.
        source: std::io::Error,
    },
    /// The file is not what it should be; the message says why.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(path: &Path, message: impl Into<String>) -> SigningError {
    SigningError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// A public key and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The key.
    pub key: VerifyingKey,
    /// First 16 hex digits of the key's sha256.
    pub id: String,
}

impl PublicKey {
    fn new(key: VerifyingKey) -> Self {
        let id = hex::encode(Sha256::digest(key.as_bytes()))[..16].to_string();
        PublicKey { key, id }
    }

    /// The key as a public key file's text.
    pub fn to_file_text(&self) -> String {
        format!("{PUBLIC_TAG} {}\n", hex::encode(self.key.as_bytes()))
    }
}

/// Parses `TAG HEX` with 32 bytes of hex.
fn parse_key_text(path: &Path, text: &str, tag: &str) -> Result<[u8; 32], SigningError> {
    let what = if tag == SECRET_TAG {
        "a secret key file (from `espalier keys generate`, the file without .pub)"
    } else {
        "a public key file (the .pub from `espalier keys generate`)"
    };
    let mut words = text.split_whitespace();
    let (Some(t), Some(h), None) = (words.next(), words.next(), words.next()) else {
        return Err(invalid(path, format!("not {what}")));
    };
    if t != tag {
        let hint = if t == SECRET_TAG || t == PUBLIC_TAG {
            format!(
                " (it is {})",
                if t == SECRET_TAG {
                    "a secret key"
                } else {
                    "a public key"
                }
            )
        } else {
            String::new()
        };
        return Err(invalid(path, format!("not {what}{hint}")));
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(h, &mut bytes)
        .map_err(|_| invalid(path, format!("not {what}: the key is not 64 hex digits")))?;
    Ok(bytes)
}

fn read_small(path: &Path) -> Result<String, SigningError> {
    espalier_engine::files::read_to_string(path, SMALL_FILE_LIMIT).map_err(|e| SigningError::Io {
        path: path.display().to_string(),
        source: e,
    })
}

/// Reads a secret key file.
pub fn read_secret_key(path: &Path) -> Result<SigningKey, SigningError> {
    let text = read_small(path)?;
    Ok(SigningKey::from_bytes(&parse_key_text(
        path, &text, SECRET_TAG,
    )?))
}

/// Reads a public key file.
pub fn read_public_key(path: &Path) -> Result<PublicKey, SigningError> {
    let text = read_small(path)?;
    let bytes = parse_key_text(path, &text, PUBLIC_TAG)?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| invalid(path, "not a valid ed25519 public key"))?;
    Ok(PublicKey::new(key))
}

/// Creates a new key pair: `path` (secret, owner-readable only) and `path.pub`. Neither may
/// exist. Returns the public key.
pub fn generate(path: &Path) -> Result<PublicKey, SigningError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| SigningError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(format!("no randomness from the system: {e}")),
    })?;
    let signing = SigningKey::from_bytes(&secret);
    let public = PublicKey::new(signing.verifying_key());
    let pub_path = public_key_path(path);
    for p in [path, pub_path.as_path()] {
        if p.exists() {
            return Err(invalid(p, "already exists; keys are never overwritten"));
        }
    }
    write_new(
        path,
        format!("{SECRET_TAG} {}\n", hex::encode(secret)).as_bytes(),
        0o600,
    )?;
    if let Err(e) = write_new(&pub_path, public.to_file_text().as_bytes(), 0o644) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(public)
}

/// `KEY.pub` for `KEY`.
pub fn public_key_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SigningError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |e| SigningError::Io {
        path: path.display().to_string(),
        source: e,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)
}

/// A signature file (`FILE.wasm.sig`, one line of JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Always [`SIGNATURE_FORMAT`].
    pub format: String,
    /// 1.
    pub version: u32,
    /// The plugin's described name.
    pub plugin: String,
    /// The plugin's described version.
    pub plugin_version: String,
    /// sha256 of the component.
    pub sha256: String,
    /// The signer's key id.
    pub key_id: String,
    /// The signer's public key, hex.
    pub public_key: String,
    /// The ed25519 signature of [`signed_message`], hex.
    pub signature: String,
}

/// What is signed: a fixed tag, the name, the version and the sha256, one per line.
pub fn signed_message(name: &str, version: &str, sha256: &str) -> Vec<u8> {
    format!("espalier-plugin-signature v1\n{name}\n{version}\n{sha256}\n").into_bytes()
}

/// Signs a plugin (its described name and version, and its sha256).
pub fn sign(key: &SigningKey, name: &str, version: &str, sha256: &str) -> SignatureFile {
    let public = PublicKey::new(key.verifying_key());
    let signature = key.sign(&signed_message(name, version, sha256));
    SignatureFile {
        format: SIGNATURE_FORMAT.into(),
        version: 1,
        plugin: name.into(),
        plugin_version: version.into(),
        sha256: sha256.into(),
        key_id: public.id,
        public_key: hex::encode(public.key.as_bytes()),
        signature: hex::encode(signature.to_bytes()),
    }
}

impl SignatureFile {
    /// The file's text: one line of JSON (so it also fits an HTTP header).
    pub fn to_text(&self) -> String {
        // Serialising plain strings and a number cannot fail.
        serde_json::to_string(self).unwrap_or_default() + "\n"
    }
}

/// `FILE.wasm.sig` for `FILE.wasm`.
pub fn signature_path(wasm: &Path) -> PathBuf {
    let mut s = wasm.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// The signature file beside `wasm`, if there is one.
pub fn read_signature_beside(wasm: &Path) -> Result<Option<Vec<u8>>, SigningError> {
    let path = signature_path(wasm);
    match espalier_engine::files::read(&path, SMALL_FILE_LIMIT) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SigningError::Io {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// Parses a signature file and checks that it is for the component with `sha256` (before the
/// component is compiled: a changed component is named as such, not as an invalid one).
pub fn check_digest(signature: &[u8], sha256: &str) -> Result<SignatureFile, String> {
    let sig: SignatureFile = serde_json::from_slice(signature)
        .map_err(|e| format!("its signature file is not an Espalier plugin signature: {e}"))?;
    if sig.format != SIGNATURE_FORMAT || sig.version != 1 {
        return Err(
            "its signature file is not an Espalier plugin signature (format or version)".into(),
        );
    }
    if sig.sha256 != sha256 {
        return Err(format!(
            "its signature is for sha256 {} (plugin `{}` {}), but the component has sha256 {sha256}: the plugin was changed after it was signed, or the signature belongs to another plugin",
            sig.sha256,
            crate::display_safe::name(&sig.plugin),
            crate::display_safe::name(&sig.plugin_version)
        ));
    }
    Ok(sig)
}

/// Who vouches for a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Signer {
    /// Compiled into this binary.
    Builtin,
    /// No signature.
    Unsigned,
    /// A valid signature by this key.
    Signed {
        /// The key id.
        key_id: String,
        /// Whether the key is one this process trusts.
        trusted: bool,
    },
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Builtin => f.write_str("builtin"),
            Signer::Unsigned => f.write_str("unsigned"),
            Signer::Signed { key_id, trusted } => write!(
                f,
                "key {key_id} ({})",
                if *trusted { "trusted" } else { "not trusted" }
            ),
        }
    }
}

/// Which signers a process accepts.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Public keys whose signatures are trusted.
    pub keys: Vec<PublicKey>,
    /// Refuse every plugin that is not built in or signed by a trusted key.
    pub require: bool,
}

impl Trust {
    /// Reads the public key files.
    pub fn from_files(paths: &[PathBuf], require: bool) -> Result<Self, SigningError> {
        let keys = paths
            .iter()
            .map(|p| read_public_key(p))
            .collect::<Result<_, _>>()?;
        Ok(Trust { keys, require })
    }

    /// Who signed the component with `sha256` that describes itself as `name` `version`,
    /// given its signature file (`None`: none): an error says why it is refused. A signature
    /// that does not verify, or is for another plugin or build, is refused even when
    /// signatures are not required; an unsigned or untrusted plugin only when they are.
    pub fn check(
        &self,
        name: &str,
        version: &str,
        sha256: &str,
        signature: Option<&[u8]>,
    ) -> Result<Signer, String> {
        let Some(bytes) = signature else {
            return if self.require {
                Err(
                    "it is not signed (no FILE.wasm.sig beside it) and signatures are required"
                        .into(),
                )
            } else {
                Ok(Signer::Unsigned)
            };
        };
        let sig = check_digest(bytes, sha256)?;
        if sig.plugin != name || sig.plugin_version != version {
            return Err(format!(
                "its signature is for plugin `{}` version {}, but the component describes itself as `{}` version {}",
                crate::display_safe::name(&sig.plugin),
                crate::display_safe::name(&sig.plugin_version),
                crate::display_safe::name(name),
                crate::display_safe::name(version)
            ));
        }
        let mut key = [0u8; 32];
        let mut raw = [0u8; 64];
        let parsed = hex::decode_to_slice(&sig.public_key, &mut key)
            .ok()
            .and_then(|()| VerifyingKey::from_bytes(&key).ok())
            .zip(hex::decode_to_slice(&sig.signature, &mut raw).ok());
        let Some((key, ())) = parsed else {
            return Err("its signature file holds a malformed key or signature".into());
        };
        let public = PublicKey::new(key);
        if public.id != sig.key_id {
            return Err(format!(
                "its signature file names key {} but holds key {}",
                crate::display_safe::name(&sig.key_id),
                public.id
            ));
        }
        let signature = ed25519_dalek::Signature::from_bytes(&raw);
        key.verify_strict(&signed_message(name, version, sha256), &signature)
            .map_err(|_| {
                format!(
                    "its signature by key {} does not verify: the signature file was altered",
                    public.id
                )
            })?;
        let trusted = self.keys.iter().any(|k| k.key == key);
        if self.require && !trusted {
            return Err(format!(
                "it is signed by key {}, which is not trusted (trust a key with --trust KEY.pub, or `trusted_keys` in the daemon's config)",
                public.id
            ));
        }
        Ok(Signer::Signed {
            key_id: public.id,
            trusted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn text(sig: &SignatureFile) -> Vec<u8> {
        sig.to_text().into_bytes()
    }

    const SHA: &str = "aa00000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_valid_signature_names_its_signer_and_trust_decides() {
        let k = key(1);
        let sig = text(&sign(&k, "wanda", "1.0.0", SHA));
        let open = Trust::default();
        let signer = open.check("wanda", "1.0.0", SHA, Some(&sig)).unwrap();
        assert!(
            matches!(&signer, Signer::Signed { trusted: false, .. }),
            "{signer}"
        );
        let trusting = Trust {
            keys: vec![PublicKey::new(k.verifying_key())],
            require: true,
        };
        assert!(matches!(
            trusting.check("wanda", "1.0.0", SHA, Some(&sig)).unwrap(),
            Signer::Signed { trusted: true, .. }
        ));
        let other = Trust {
            keys: vec![PublicKey::new(key(2).verifying_key())],
            require: true,
        };
        let e = other.check("wanda", "1.0.0", SHA, Some(&sig)).unwrap_err();
        assert!(e.contains("not trusted"), "{e}");
        assert!(
            other
                .check("wanda", "1.0.0", SHA, None)
                .unwrap_err()
                .contains("not signed")
        );
        assert_eq!(
            open.check("wanda", "1.0.0", SHA, None).unwrap(),
            Signer::Unsigned
        );
    }

    #[test]
    fn a_signature_for_another_plugin_build_or_altered_is_refused() {
        let sig = sign(&key(1), "wanda", "1.0.0", SHA);
        let open = Trust::default();
        let other_sha = SHA.replace("aa", "bb");
        let e = open
            .check("wanda", "1.0.0", &other_sha, Some(&text(&sig)))
            .unwrap_err();
        assert!(e.contains("changed after it was signed"), "{e}");
        let e = open
            .check("magnitude", "1.0.0", SHA, Some(&text(&sig)))
            .unwrap_err();
        assert!(e.contains("is for plugin `wanda`"), "{e}");
        let mut altered = sig.clone();
        let flipped = if altered.signature.starts_with("00") {
            "01"
        } else {
            "00"
        };
        altered.signature.replace_range(0..2, flipped);
        let e = open
            .check("wanda", "1.0.0", SHA, Some(&text(&altered)))
            .unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let e = open.check("wanda", "1.0.0", SHA, Some(b"{}")).unwrap_err();
        assert!(e.contains("not an Espalier plugin signature"), "{e}");
    }

    #[test]
    fn key_files_round_trip_and_wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("team");
        let public = generate(&secret).unwrap();
        assert!(generate(&secret).is_err(), "never overwrites");
        assert_eq!(read_public_key(&public_key_path(&secret)).unwrap(), public);
        let k = read_secret_key(&secret).unwrap();
        assert_eq!(PublicKey::new(k.verifying_key()), public);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "secret key readable by others: {mode:o}");
        // The public file where a secret one is expected, and the reverse, and junk.
        let e = read_secret_key(&public_key_path(&secret))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a secret key file") && e.contains("it is a public key"),
            "{e}"
        );
        let e = read_public_key(&secret).unwrap_err().to_string();
        assert!(e.contains("not a public key file"), "{e}");
        let junk = dir.path().join("junk.pub");
        std::fs::write(&junk, "hello world\n").unwrap();
        assert!(
            read_public_key(&junk)
                .unwrap_err()
                .to_string()
                .contains("not a public key file")
        );
        std::fs::write(&junk, format!("{PUBLIC_TAG} zz\n")).unwrap();
        assert!(
            read_public_key(&junk)
                .unwrap_err()
                .to_string()
                .contains("64 hex digits")
        );
    }
}
