//! Plugins in OCI registries: `espalier plugins push|pull`, `oci://` plugins in pipelines and
//! `POST /v1/plugins/pull`.
//!
//! The artifact is the CNCF wasm OCI layout that `wkg` and `oras` read: an OCI image manifest
//! whose config has media type [`CONFIG_MEDIA_TYPE`] (architecture `wasm`, os `wasip2`, the
//! layer digests and the component's imports and exports) and exactly one layer, the component,
//! with media type [`LAYER_MEDIA_TYPE`]. The layer's digest is therefore the plugin's sha256.
//! An Espalier signature ([`super::signing`]) travels as the manifest annotation
//! [`SIGNATURE_ANNOTATION`]: other tools still see a plain one-layer component.
//!
//! Talking to the registry is `oci-client`'s job (authentication, blob uploads). What comes
//! back is bounded here: the manifest is read with a size cap, each blob is streamed with the
//! size its descriptor declares (and [`LAYER_LIMIT`] at most) as a hard cap, every blob's
//! sha256 is checked against its descriptor, and the whole exchange has a time limit
//! (`$ESPALIER_REGISTRY_TIMEOUT` seconds, default 60). Nothing is registered or written
//! before all of that passed. Plain http is used only for loopback registries (`localhost`,
//! `127.x`, `::1`); every other registry is reached over https (rustls, the system's roots).
//!
//! Credentials come from the environment (`$ESPALIER_REGISTRY_USERNAME` and
//! `$ESPALIER_REGISTRY_PASSWORD`, sent only to `$ESPALIER_REGISTRY_HOST`) or the Docker config
//! file (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, its `auths` and credential
//! helpers), never from a pipeline.
//!
//! Pulled artifacts used by pipelines are cached by digest ([`PullCache`]): the manifest under
//! `manifests/HEX.json`, the component under `blobs/HEX.wasm`, each checked against its digest
//! when read back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Media type of the manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the config blob of a wasm artifact.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Media type of the component layer.
pub const LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Manifest annotation holding the plugin's signature file (one line of JSON).
pub const SIGNATURE_ANNOTATION: &str = "dev.espalier.plugin.signature";
/// Largest manifest read (containerd and distribution use the same cap).
pub const MANIFEST_LIMIT: u64 = 4 << 20;
/// Largest config blob read.
pub const CONFIG_LIMIT: u64 = 1 << 20;
/// Largest component read (the limit on plugin files).
pub const LAYER_LIMIT: u64 = espalier_engine::files::PLUGIN_LIMIT;
/// Default limit on one registry exchange (push or pull), in seconds.
const DEFAULT_TIMEOUT_SECS: u64 = 60;

/// Why a push or pull failed. Nothing was registered or written.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The text is not a usable registry reference.
    #[error(
        "`{reference}` is not a registry reference: {message} (write REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:DIGEST, e.g. localhost:5000/team/wanda:1.0)"
    )]
    Reference {
        /// The text as given.
        reference: String,
        /// What is wrong with it.
        message: String,
    },
    /// The registry could not be reached, refused, or answered something unusable.
    #[error("{reference}: {message}")]
    Registry {
        /// The reference being pushed or pulled.
        reference: String,
        /// What happened.
        message: String,
    },
    /// What the registry sent does not match its digest, or is not a wasm component artifact.
    #[error("{reference}: refused: {message}")]
    Verify {
        /// The reference being pulled.
        reference: String,
        /// What does not match.
        message: String,
    },
    /// Credentials are configured wrongly.
    #[error("registry credentials: {0}")]
    Credentials(String),
    /// The pull cache could not be read or written.
    #[error("{path}: {message}")]
    Cache {
        /// The file or folder.
        path: String,
        /// What happened.
        message: String,
    },
}

/// A parsed registry reference, with the text it came from.
#[derive(Debug, Clone)]
pub struct OciRef {
    reference: Reference,
    text: String,
}

impl OciRef {
    /// Parses `REGISTRY/REPOSITORY[:TAG][@sha256:HEX]`, with or without `oci://` in front.
    /// The registry must be named (a host with a `.` or a port, or `localhost`): a bare
    /// `team/wanda` would silently mean Docker Hub.
    pub fn parse(text: &str) -> Result<Self, OciError> {
        let bad = |message: &str| OciError::Reference {
            reference: crate::display_safe::name(text).to_string(),
            message: message.to_string(),
        };
        let body = text.strip_prefix("oci://").unwrap_or(text);
        if body.is_empty() || body.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it is empty or holds spaces or control characters"));
        }
        let Some((host, _)) = body.split_once('/') else {
            return Err(bad("it names no registry"));
        };
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(bad(&format!(
                "`{}` is not a registry host (a registry has a `.` or a port in its name, or is `localhost`)",
                crate::display_safe::name(host)
            )));
        }
        let reference: Reference = body.parse().map_err(|e| bad(&format!("{e}")))?;
        if let Some(d) = reference.digest()
            && !d
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad("its digest is not sha256: with 64 hex digits"));
        }
        Ok(OciRef {
            reference,
            text: text.to_string(),
        })
    }

    /// The registry host (with its port).
    pub fn registry(&self) -> &str {
        self.reference.registry()
    }

    /// The reference as given.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// `sha256:HEX` when the reference names a digest.
    pub fn digest(&self) -> Option<&str> {
        self.reference.digest()
    }

    /// `oci://REGISTRY/REPOSITORY@DIGEST`: the reference pinned to one manifest.
    pub fn pinned(&self, manifest_digest: &str) -> String {
        format!(
            "oci://{}/{}@{manifest_digest}",
            self.reference.registry(),
            self.reference.repository()
        )
    }

    fn scheme(&self) -> &'static str {
        if is_loopback(self.registry()) {
            "http"
        } else {
            "https"
        }
    }
}

/// Whether `registry` (`HOST[:PORT]`) is a loopback address: only those are spoken to over
/// plain http.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The config blob of a wasm artifact (the CNCF wasm OCI layout).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmConfig {
    /// When it was pushed (RFC 3339).
    pub created: String,
    /// Who pushed it, when known.
    #[serde(default)]
    pub author: Option<String>,
    /// Always `wasm`.
    pub architecture: String,
    /// `wasip2` for a component.
    pub os: String,
    /// The digest of each layer.
    pub layer_digests: Vec<String>,
    /// The component's imports and exports.
    #[serde(default)]
    pub component: Option<ComponentInterfaces>,
}

/// The interfaces a component imports and exports, as listed in the artifact's config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ComponentInterfaces {
    /// Exported names.
    pub exports: Vec<String>,
    /// Imported names.
    pub imports: Vec<String>,
    /// The world it targets, when known.
    #[serde(default)]
    pub target: Option<String>,
}

/// What a push needs besides the component bytes.
pub struct PushRequest<'a> {
    /// The component.
    pub wasm: &'a [u8],
    /// Its signature file, when it is signed.
    pub signature: Option<&'a [u8]>,
    /// The plugin's described name and version (image title and version annotations).
    pub name: &'a str,
    /// The plugin's version.
    pub version: &'a str,
    /// Its imports and exports, for the config.
    pub interfaces: ComponentInterfaces,
}

/// A pushed artifact.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The manifest digest the registry stored (`sha256:HEX`).
    pub manifest_digest: String,
    /// The reference pinned to that digest.
    pub pinned: String,
}

/// A pulled, verified artifact (not yet admitted: the caller compiles it and checks its
/// signature against its trust).
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The manifest digest (`sha256:HEX`).
    pub manifest_digest: String,
    /// `oci://REGISTRY/REPOSITORY@sha256:HEX`.
    pub pinned: String,
    /// The component; its sha256 is the layer's digest.
    pub wasm: Vec<u8>,
    /// The signature file carried in the manifest, if any.
    pub signature: Option<Vec<u8>>,
}

/// The limit on one registry exchange: `$ESPALIER_REGISTRY_TIMEOUT` seconds, default 60.
pub fn timeout() -> Result<Duration, OciError> {
    match std::env::var("ESPALIER_REGISTRY_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(DEFAULT_TIMEOUT_SECS)),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                OciError::Credentials(format!(
                    "ESPALIER_REGISTRY_TIMEOUT must be a number of seconds between 0 and 3600, found `{}`",
                    crate::display_safe::name(&v)
                ))
            }),
    }
}

/// The credentials for `registry`: the `$ESPALIER_REGISTRY_*` variables when they name it,
/// else the Docker config file, else anonymous.
pub fn credentials(registry: &str) -> Result<RegistryAuth, OciError> {
    let user = std::env::var("ESPALIER_REGISTRY_USERNAME").ok();
    let password = std::env::var("ESPALIER_REGISTRY_PASSWORD").ok();
    if user.is_some() || password.is_some() {
        let Some(host) = std::env::var("ESPALIER_REGISTRY_HOST").ok() else {
            return Err(OciError::Credentials(
                "ESPALIER_REGISTRY_USERNAME/PASSWORD are set but ESPALIER_REGISTRY_HOST is not: name the registry they are for (they are sent to no other)".into(),
            ));
        };
        if host == registry {
            let (Some(user), Some(password)) = (user, password) else {
                return Err(OciError::Credentials(
                    "set both ESPALIER_REGISTRY_USERNAME and ESPALIER_REGISTRY_PASSWORD".into(),
                ));
            };
            return Ok(RegistryAuth::Basic(user, password));
        }
    }
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    match docker_credential::get_credential(registry) {
        Ok(DockerCredential::UsernamePassword(u, p)) => Ok(RegistryAuth::Basic(u, p)),
        Ok(DockerCredential::IdentityToken(_)) => Err(OciError::Credentials(format!(
            "the Docker config holds an identity token for {registry}, which Espalier cannot use; log in with a username and password, or set ESPALIER_REGISTRY_HOST, _USERNAME and _PASSWORD"
        ))),
        Err(E::ConfigNotFound | E::ConfigReadError | E::NoCredentialConfigured) => {
            Ok(RegistryAuth::Anonymous)
        }
        Err(e) => Err(OciError::Credentials(format!(
            "reading the Docker config's credentials for {registry}: {}",
            crate::display_safe::message(&e.to_string(), "")
        ))),
    }
}

/// One registry exchange: a client, its credentials, a runtime and the time limit.
struct Session {
    oci: OciRef,
    client: Client,
    http: reqwest::Client,
    auth: RegistryAuth,
    limit: Duration,
}

impl Session {
    fn new(oci: OciRef) -> Result<Self, OciError> {
        // reqwest is built without a default crypto provider (no aws-lc-rs C build): install
        // ring's once per process; a second install is refused and harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let limit = timeout()?;
        let auth = credentials(oci.registry())?;
        let protocol = if is_loopback(oci.registry()) {
            ClientProtocol::HttpsExcept(vec![oci.registry().to_string()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::try_from(ClientConfig {
            protocol,
            // Past the whole-exchange limit, so a stalled body is reported by that limit.
            read_timeout: Some(limit + Duration::from_secs(1)),
            connect_timeout: Some(limit.min(Duration::from_secs(10))),
            // An image index is not a plugin: refuse it rather than pick a platform.
            platform_resolver: None,
            max_concurrent_upload: 1,
            max_concurrent_download: 1,
            user_agent: concat!("espalier/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        })
        .map_err(|e| registry_error(&oci, &e.to_string()))?;
        let http = reqwest::Client::builder()
            .read_timeout(limit + Duration::from_secs(1))
            .connect_timeout(limit.min(Duration::from_secs(10)))
            .user_agent(concat!("espalier/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| registry_error(&oci, &e.to_string()))?;
        Ok(Session {
            oci,
            client,
            http,
            auth,
            limit,
        })
    }

    /// Runs `work` on a fresh single-threaded runtime under the time limit.
    fn run<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, OciError>>,
    ) -> Result<T, OciError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| registry_error(&self.oci, &format!("cannot start a runtime: {e}")))?;
        runtime.block_on(async {
            tokio::time::timeout(self.limit, work)
                .await
                .unwrap_or_else(|_| {
                    Err(registry_error(
                        &self.oci,
                        &format!(
                            "the registry did not finish within {:.0} s (ESPALIER_REGISTRY_TIMEOUT); nothing was registered",
                            self.limit.as_secs_f64()
                        ),
                    ))
                })
        })
    }

    /// Maps an `oci-client` error to one that says what to do.
    fn client_error(&self, e: &oci_client::errors::OciDistributionError) -> OciError {
        use oci_client::errors::OciDistributionError as D;
        match e {
            D::UnauthorizedError { .. } => self.unauthorized(),
            D::AuthenticationFailure(m) => registry_error(
                &self.oci,
                &format!(
                    "the registry refused the credentials: {}",
                    crate::display_safe::line(m, 300)
                ),
            ),
            D::ImageManifestNotFoundError(_) => self.not_found(),
            D::RequestError(r) => match r.status() {
                Some(s)
                    if s == reqwest::StatusCode::UNAUTHORIZED
                        || s == reqwest::StatusCode::FORBIDDEN =>
                {
                    self.unauthorized()
                }
                Some(s) => registry_error(&self.oci, &format!("the registry answered {s}")),
                None => self.transport_error(r),
            },
            other => registry_error(
                &self.oci,
                &crate::display_safe::line(&other.to_string(), 500),
            ),
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> OciError {
        let scheme = self.oci.scheme();
        let mut message = format!(
            "cannot reach the registry {} over {scheme}: {}",
            self.oci.registry(),
            error_chain(e)
        );
        if e.is_timeout() {
            message.push_str(" (timed out; ESPALIER_REGISTRY_TIMEOUT sets the limit)");
        } else if scheme == "https" {
            message.push_str(" (registries other than loopback ones are reached over https only)");
        }
        registry_error(&self.oci, &message)
    }

    fn unauthorized(&self) -> OciError {
        let how = match &self.auth {
            RegistryAuth::Anonymous => format!(
                "no credentials for {} were found: log in with `docker login {}` (the Docker config file, $DOCKER_CONFIG/config.json or ~/.docker/config.json) or set ESPALIER_REGISTRY_HOST={}, ESPALIER_REGISTRY_USERNAME and ESPALIER_REGISTRY_PASSWORD",
                self.oci.registry(),
                self.oci.registry(),
                self.oci.registry()
            ),
            _ => "the credentials given were not accepted".to_string(),
        };
        registry_error(
            &self.oci,
            &format!("the registry asks for credentials: {how}"),
        )
    }

    fn not_found(&self) -> OciError {
        registry_error(
            &self.oci,
            &format!(
                "not found: the registry {} has no {} in repository `{}`",
                self.oci.registry(),
                match (self.oci.reference.digest(), self.oci.reference.tag()) {
                    (Some(d), _) => format!("manifest {d}"),
                    (None, Some(t)) => format!("tag `{t}`"),
                    (None, None) => "such manifest".into(),
                },
                self.oci.reference.repository()
            ),
        )
    }

    /// GETs the manifest with a size cap, checks its digest and parses it.
    async fn manifest(&self) -> Result<(OciImageManifest, Vec<u8>, String), OciError> {
        let token = self
            .client
            .auth(&self.oci.reference, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| self.client_error(&e))?;
        let r = &self.oci.reference;
        let target = r.digest().or(r.tag()).unwrap_or("latest");
        let url = format!(
            "{}://{}/v2/{}/manifests/{target}",
            self.oci.scheme(),
            r.resolve_registry(),
            r.repository()
        );
        let mut request = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, MANIFEST_MEDIA_TYPE);
        request = match (&token, &self.auth) {
            (Some(t), _) => request.bearer_auth(t),
            (None, RegistryAuth::Basic(u, p)) => request.basic_auth(u, Some(p)),
            (None, RegistryAuth::Bearer(t)) => request.bearer_auth(t),
            (None, RegistryAuth::Anonymous) => request,
        };
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(self.not_found());
        }
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(self.unauthorized());
        }
        if !status.is_success() {
            return Err(registry_error(
                &self.oci,
                &format!("the registry answered {status} for the manifest"),
            ));
        }
        let announced = response.content_length();
        let body = read_capped(response.bytes_stream(), announced, MANIFEST_LIMIT)
            .await
            .map_err(|e| match e {
                ReadError::TooBig => too_big(&self.oci, "the manifest", MANIFEST_LIMIT),
                ReadError::Stream(m, _) => read_failed(&self.oci, "the manifest", &m),
            })?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if let Some(want) = r.digest()
            && want != digest
        {
            return Err(verify_error(
                &self.oci,
                format!("the manifest has digest {digest}, not the {want} asked for"),
            ));
        }
        let manifest: OciImageManifest = serde_json::from_slice(&body).map_err(|e| {
            verify_error(
                &self.oci,
                format!("the manifest is not an OCI image manifest: {e}"),
            )
        })?;
        check_layout(&self.oci, &manifest)?;
        Ok((manifest, body, digest))
    }

    /// Streams one blob with its descriptor's size as the cap, and checks its digest.
    async fn blob(&self, descriptor: &OciDescriptor, what: &str) -> Result<Vec<u8>, OciError> {
        let declared = u64::try_from(descriptor.size).unwrap_or(0);
        let stream = self
            .client
            .pull_blob_stream(&self.oci.reference, descriptor)
            .await
            .map_err(|e| self.client_error(&e))?;
        let mismatch = |actual: &str| {
            verify_error(
                &self.oci,
                format!(
                    "{what}'s content has digest {actual}, but its descriptor says {}: the registry's copy is corrupt or was altered",
                    descriptor.digest
                ),
            )
        };
        let bytes = match read_capped(stream.stream, stream.content_length, declared).await {
            Ok(b) => b,
            Err(ReadError::TooBig) => return Err(too_big(&self.oci, what, declared)),
            // oci-client checks the digest as the stream ends and fails it on a mismatch:
            // name the mismatch (all bytes are in) rather than a read error.
            Err(ReadError::Stream(m, partial)) => {
                let actual = format!("sha256:{}", hex::encode(Sha256::digest(&partial)));
                return Err(
                    if partial.len() as u64 == declared && actual != descriptor.digest {
                        mismatch(&actual)
                    } else {
                        read_failed(&self.oci, what, &m)
                    },
                );
            }
        };
        if bytes.len() as u64 != declared {
            return Err(verify_error(
                &self.oci,
                format!(
                    "{what} is {} bytes, but the manifest declares {declared}",
                    bytes.len()
                ),
            ));
        }
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if digest != descriptor.digest {
            return Err(mismatch(&digest));
        }
        Ok(bytes)
    }
}

/// Why a capped read stopped.
enum ReadError {
    /// More than the cap was announced or sent.
    TooBig,
    /// The stream failed, after the bytes given.
    Stream(String, Vec<u8>),
}

/// Reads a body of at most `cap` bytes; one that announces or sends more is cut off.
async fn read_capped<S, B, E>(
    stream: S,
    announced: Option<u64>,
    cap: u64,
) -> Result<Vec<u8>, ReadError>
where
    S: futures_util::Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    if announced.is_some_and(|n| n > cap) {
        return Err(ReadError::TooBig);
    }
    let mut out = Vec::with_capacity(usize::try_from(announced.unwrap_or(0).min(cap)).unwrap_or(0));
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Err(ReadError::Stream(e.to_string(), out)),
        };
        let chunk = chunk.as_ref();
        if out.len() as u64 + chunk.len() as u64 > cap {
            return Err(ReadError::TooBig);
        }
        out.extend_from_slice(chunk);
    }
    Ok(out)
}

fn too_big(oci: &OciRef, what: &str, cap: u64) -> OciError {
    verify_error(
        oci,
        format!("the registry sent more than the {cap} bytes {what} may have; cut off"),
    )
}

fn read_failed(oci: &OciRef, what: &str, message: &str) -> OciError {
    registry_error(
        oci,
        &format!(
            "reading {what}: {}",
            crate::display_safe::line(message, 300)
        ),
    )
}

/// The wasm component layout: an image manifest with the wasm config and one wasm layer of
/// bounded size.
fn check_layout(oci: &OciRef, m: &OciImageManifest) -> Result<(), OciError> {
    let refuse = |message: String| Err(verify_error(oci, message));
    if m.media_type
        .as_deref()
        .is_some_and(|t| t != MANIFEST_MEDIA_TYPE)
    {
        return refuse(format!(
            "the manifest has media type {}, not {MANIFEST_MEDIA_TYPE}",
            crate::display_safe::name(m.media_type.as_deref().unwrap_or_default())
        ));
    }
    if m.config.media_type != CONFIG_MEDIA_TYPE {
        return refuse(format!(
            "its config has media type {}, not {CONFIG_MEDIA_TYPE}: it is not a wasm artifact",
            crate::display_safe::name(&m.config.media_type)
        ));
    }
    let [layer] = m.layers.as_slice() else {
        return refuse(format!(
            "a wasm component artifact has exactly one layer; this one has {}",
            m.layers.len()
        ));
    };
    if layer.media_type != LAYER_MEDIA_TYPE {
        return refuse(format!(
            "its layer has media type {}, not {LAYER_MEDIA_TYPE}",
            crate::display_safe::name(&layer.media_type)
        ));
    }
    for (d, what, limit) in [
        (&m.config, "the config", CONFIG_LIMIT),
        (layer, "the component", LAYER_LIMIT),
    ] {
        if d.size <= 0 || d.size as u64 > limit {
            return refuse(format!(
                "{what} is declared as {} bytes; at most {limit} are accepted",
                d.size
            ));
        }
        if layer_hex(&d.digest).is_none() {
            return refuse(format!(
                "{what}'s digest `{}` is not sha256:HEX",
                crate::display_safe::name(&d.digest)
            ));
        }
    }
    Ok(())
}

/// The hex of a `sha256:HEX` digest.
fn layer_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

fn registry_error(oci: &OciRef, message: &str) -> OciError {
    OciError::Registry {
        reference: crate::display_safe::name(oci.text()).to_string(),
        message: message.to_string(),
    }
}

fn verify_error(oci: &OciRef, message: String) -> OciError {
    OciError::Verify {
        reference: crate::display_safe::name(oci.text()).to_string(),
        message,
    }
}

/// An error and its causes on one line (reqwest's own message hides "connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    crate::display_safe::line(&parts.join(": "), 500).to_string()
}

/// Pushes a component as a wasm artifact to `reference` (a tag). Returns the manifest digest.
pub fn push(reference: &str, request: &PushRequest<'_>) -> Result<Pushed, OciError> {
    let oci = OciRef::parse(reference)?;
    if oci.digest().is_some() {
        return Err(OciError::Reference {
            reference: crate::display_safe::name(reference).to_string(),
            message: "push to a tag (REGISTRY/REPOSITORY:TAG); the registry computes the digest"
                .into(),
        });
    }
    let session = Session::new(oci)?;
    let layer_digest = format!("sha256:{}", hex::encode(Sha256::digest(request.wasm)));
    let config = WasmConfig {
        created: rfc3339_now(),
        author: None,
        architecture: "wasm".into(),
        os: "wasip2".into(),
        layer_digests: vec![layer_digest],
        component: Some(request.interfaces.clone()),
    };
    let config = Config {
        data: serde_json::to_vec(&config)
            .map_err(|e| registry_error(&session.oci, &e.to_string()))?
            .into(),
        media_type: CONFIG_MEDIA_TYPE.to_string(),
        annotations: None,
    };
    let layers = vec![ImageLayer::new(
        request.wasm.to_vec(),
        LAYER_MEDIA_TYPE.to_string(),
        None,
    )];
    let mut annotations = BTreeMap::from([
        (
            "org.opencontainers.image.title".to_string(),
            crate::display_safe::name(request.name),
        ),
        (
            "org.opencontainers.image.version".to_string(),
            crate::display_safe::name(request.version),
        ),
    ]);
    if let Some(sig) = request.signature {
        // oci-client writes the manifest as canonical JSON, which leaves control characters
        // raw: the annotation is the signature file's one line, without its newline.
        let line = std::str::from_utf8(sig)
            .ok()
            .map(|t| t.trim_end_matches(['\n', '\r']))
            .filter(|t| !t.chars().any(char::is_control))
            .ok_or_else(|| {
                registry_error(
                    &session.oci,
                    "the signature file is not one line of text; sign the plugin again",
                )
            })?;
        annotations.insert(SIGNATURE_ANNOTATION.to_string(), line.to_string());
    }
    let mut manifest = OciImageManifest::build(&layers, &config, Some(annotations));
    manifest.media_type = Some(MANIFEST_MEDIA_TYPE.to_string());
    session.run(async {
        let r = &session.oci.reference;
        session
            .client
            .push(r, &layers, config, &session.auth, Some(manifest))
            .await
            .map_err(|e| session.client_error(&e))?;
        let digest = session
            .client
            .fetch_manifest_digest(r, &session.auth)
            .await
            .map_err(|e| session.client_error(&e))?;
        Ok(Pushed {
            pinned: session.oci.pinned(&digest),
            manifest_digest: digest,
        })
    })
}

/// Pulls and verifies a wasm artifact: the manifest (capped, checked against a digest in the
/// reference), the config and the component (each capped at its declared size and checked
/// against its digest). `have` may supply the component by its sha256 hex (a cache), which
/// skips downloading it.
pub fn pull(reference: &str) -> Result<Pulled, OciError> {
    pull_with(&OciRef::parse(reference)?, |_| None).map(|(p, _)| p)
}

fn pull_with(
    oci: &OciRef,
    have: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<(Pulled, Vec<u8>), OciError> {
    let session = Session::new(oci.clone())?;
    session.run(async {
        let (manifest, manifest_bytes, digest) = session.manifest().await?;
        let layer = &manifest.layers[0];
        let config = session.blob(&manifest.config, "the config").await?;
        let config: WasmConfig = serde_json::from_slice(&config).map_err(|e| {
            verify_error(
                &session.oci,
                format!("the config is not a wasm artifact config: {e}"),
            )
        })?;
        if config.architecture != "wasm" {
            return Err(verify_error(
                &session.oci,
                format!(
                    "the config's architecture is `{}`, not `wasm`",
                    crate::display_safe::name(&config.architecture)
                ),
            ));
        }
        let hex = layer_hex(&layer.digest).unwrap_or_default();
        let wasm = match have(hex) {
            Some(bytes) => bytes,
            None => session.blob(layer, "the component").await?,
        };
        let signature = manifest
            .annotations
            .as_ref()
            .and_then(|a| a.get(SIGNATURE_ANNOTATION))
            .map(|line| signature_file(line));
        Ok((
            Pulled {
                pinned: session.oci.pinned(&digest),
                manifest_digest: digest,
                wasm,
                signature,
            },
            manifest_bytes,
        ))
    })
}

/// The signature file an annotation carries: its line and the newline the push removed.
fn signature_file(line: &str) -> Vec<u8> {
    format!("{line}\n").into_bytes()
}

/// The current time as RFC 3339 (UTC).
fn rfc3339_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Pulled artifacts by digest, in a folder Espalier owns (`CACHE/oci`).
#[derive(Debug, Clone)]
pub struct PullCache {
    dir: PathBuf,
}

/// An artifact from the cache (or just pulled into it).
#[derive(Debug, Clone)]
pub struct Cached {
    /// The component file in the cache.
    pub path: PathBuf,
    /// The artifact.
    pub pulled: Pulled,
}

impl PullCache {
    /// A cache in `dir` (created on first use).
    pub fn new(dir: PathBuf) -> Self {
        PullCache { dir }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn manifest_path(&self, hex: &str) -> PathBuf {
        self.dir.join("manifests").join(format!("{hex}.json"))
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{hex}.wasm"))
    }

    /// A cached file whose content still has the digest it is named by.
    fn read_verified(&self, path: &Path, hex: &str, limit: u64) -> Option<Vec<u8>> {
        let bytes = espalier_engine::files::read(path, limit).ok()?;
        (hex::encode(Sha256::digest(&bytes)) == hex).then_some(bytes)
    }

    /// The artifact `reference` names: from the cache when the reference names a digest that
    /// is cached, else pulled (the component downloaded only when not cached) and cached.
    pub fn fetch(&self, reference: &str) -> Result<Cached, OciError> {
        let oci = OciRef::parse(reference)?;
        if let Some(hit) = oci
            .digest()
            .and_then(layer_hex)
            .and_then(|hex| self.cached(&oci, hex))
        {
            return Ok(hit);
        }
        let (pulled, manifest) = pull_with(&oci, |hex| {
            self.read_verified(&self.blob_path(hex), hex, LAYER_LIMIT)
        })?;
        let manifest_hex = layer_hex(&pulled.manifest_digest).unwrap_or_default();
        let layer_hex = hex::encode(Sha256::digest(&pulled.wasm));
        let path = self.blob_path(&layer_hex);
        self.store(&path, &pulled.wasm)?;
        self.store(&self.manifest_path(manifest_hex), &manifest)?;
        Ok(Cached { path, pulled })
    }

    /// The cached artifact with manifest digest `hex`, if manifest and component are both
    /// cached intact.
    fn cached(&self, oci: &OciRef, hex: &str) -> Option<Cached> {
        let manifest = self.read_verified(&self.manifest_path(hex), hex, MANIFEST_LIMIT)?;
        let parsed: OciImageManifest = serde_json::from_slice(&manifest).ok()?;
        check_layout(oci, &parsed).ok()?;
        let layer = layer_hex(&parsed.layers[0].digest)?;
        let path = self.blob_path(layer);
        let wasm = self.read_verified(&path, layer, LAYER_LIMIT)?;
        let digest = format!("sha256:{hex}");
        Some(Cached {
            path,
            pulled: Pulled {
                pinned: oci.pinned(&digest),
                manifest_digest: digest,
                wasm,
                signature: parsed
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SIGNATURE_ANNOTATION))
                    .map(|line| signature_file(line)),
            },
        })
    }

    /// Writes `bytes` to `path` through a temporary file in the same folder and a rename
    /// (the cache holds only files named by their digest, so replacing one changes nothing).
    fn store(&self, path: &Path, bytes: &[u8]) -> Result<(), OciError> {
        crate::atomic::write_atomic(path, bytes).map_err(|e| OciError::Cache {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_their_registry() {
        let r = OciRef::parse("oci://localhost:5000/team/wanda:1.0").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.digest(), None);
        let d = format!("localhost:5000/team/wanda@sha256:{}", "ab".repeat(32));
        let r = OciRef::parse(&d).unwrap();
        assert_eq!(r.pinned(r.digest().unwrap()), format!("oci://{d}"));
        for bad in [
            "",
            "wanda",
            "team/wanda:1.0",
            "localhost:5000/Team/wanda:1.0",
            "localhost:5000/team/wanda:1.0 ",
            "localhost:5000/team/wanda@sha256:abc",
            "localhost:5000/team/wanda:!",
        ] {
            let e = OciRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains("is not a registry reference"), "{bad}: {e}");
        }
    }

    #[test]
    fn only_loopback_registries_are_plain_http() {
        for h in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example.com:5000",
            "[::2]:5000",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn the_layout_check_refuses_what_is_not_one_wasm_layer() {
        let oci = OciRef::parse("localhost:5000/t/w:1").unwrap();
        let d = |media: &str, size: i64| OciDescriptor {
            media_type: media.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size,
            ..OciDescriptor::default()
        };
        let mut m = OciImageManifest {
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            config: d(CONFIG_MEDIA_TYPE, 10),
            layers: vec![d(LAYER_MEDIA_TYPE, 10)],
            ..OciImageManifest::default()
        };
        check_layout(&oci, &m).unwrap();
        m.layers.push(d(LAYER_MEDIA_TYPE, 10));
        assert!(
            check_layout(&oci, &m)
                .unwrap_err()
                .to_string()
                .contains("exactly one layer")
        );
        m.layers.pop();
        m.layers[0].size = LAYER_LIMIT as i64 + 1;
        assert!(
            check_layout(&oci, &m)
                .unwrap_err()
                .to_string()
                .contains("at most")
        );
        m.layers[0].size = 10;
        m.config.media_type = "application/vnd.oci.image.config.v1+json".into();
        assert!(
            check_layout(&oci, &m)
                .unwrap_err()
                .to_string()
                .contains("not a wasm artifact")
        );
    }
}
