//! The image archive of `graft agent-image`: the image reference and
//! platform, the OCI config, manifest and index (`oci-spec` types) and Docker's
//! `manifest.json` derived from the layer, and the one tar that holds both
//! layouts (see the parent module).

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, Write},
    str::FromStr,
};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

use super::{AGENT_PATH, IMAGE_PATH_ENV};

/// An image name: `[registry/]repository:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The fully qualified name, e.g. `docker.io/library/graft-agent:1.0`
    /// (containerd's `io.containerd.image.name`).
    pub name: String,
    /// The name as Docker shows it, e.g. `graft-agent:1.0` (`RepoTags`).
    pub familiar: String,
    /// The tag alone (`org.opencontainers.image.ref.name`, as Docker writes it).
    pub tag: String,
}

impl Reference {
    /// Parses `NAME[:TAG]` (tag `latest` when absent) and qualifies it the way
    /// Docker does: no registry means `docker.io`, no namespace there means
    /// `library/`.
    pub fn parse(input: &str) -> Result<Reference, String> {
        let bad = |why: &str| format!("bad image name {input:?}: {why}");
        if input.contains('@') {
            return Err(bad("a digest cannot be written; give NAME:TAG"));
        }
        let last_slash = input.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match input[last_slash..].rfind(':') {
            Some(i) => (&input[..last_slash + i], &input[last_slash + i + 1..]),
            None => (input, "latest"),
        };
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && !tag.starts_with(['.', '-'])
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !tag_ok {
            return Err(bad("the tag must be 1-128 of A-Z a-z 0-9 _ . -"));
        }
        let mut parts: Vec<&str> = repository.split('/').collect();
        let has_registry =
            parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost");
        let registry = if has_registry {
            parts.remove(0)
        } else {
            "docker.io"
        };
        let path_ok = parts.iter().all(|p| {
            !p.is_empty()
                && p.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
        });
        let registry_ok = !registry.is_empty()
            && registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-'));
        if !path_ok || !registry_ok {
            return Err(bad(
                "the repository must be lower-case letters, digits, `.`, `_`, `-` and `/`",
            ));
        }
        if registry == "docker.io" && parts.len() == 1 {
            parts.insert(0, "library");
        }
        let path = parts.join("/");
        let name = format!("{registry}/{path}:{tag}");
        let familiar = match (registry, path.strip_prefix("library/")) {
            ("docker.io", Some(short)) => format!("{short}:{tag}"),
            ("docker.io", None) => format!("{path}:{tag}"),
            _ => name.clone(),
        };
        Ok(Reference {
            name,
            familiar,
            tag: tag.to_owned(),
        })
    }
}

/// The platform in the config: GOARCH/GOOS names (OCI `config.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `linux`.
    pub os: String,
}

impl Platform {
    /// The machine graft was built for, which is the machine whose files the
    /// image takes.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            architecture: architecture.to_owned(),
            os: std::env::consts::OS.to_owned(),
        }
    }
}

/// Everything the archive holds, derived from the layer.
#[derive(Debug, Clone)]
pub struct ImageBlobs {
    /// The layer tar.
    pub layer: Vec<u8>,
    /// `sha256:<hex>` of the layer, which is also its diff ID (uncompressed).
    pub layer_digest: String,
    /// The image config JSON (OCI `config.md`, Docker's image JSON).
    pub config: Vec<u8>,
    /// `sha256:<hex>` of the config: the image ID.
    pub config_digest: String,
    /// The OCI image manifest (`manifest.md`).
    pub manifest: Vec<u8>,
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    /// `index.json` (`image-layout.md`).
    pub index: Vec<u8>,
    /// Docker's `manifest.json` (image spec v1.2).
    pub docker_manifest: Vec<u8>,
}

impl ImageBlobs {
    /// The config, manifest and index of a one-layer image of `layer`, as
    /// `oci-spec` types serialized with sorted keys (deterministic bytes).
    pub fn new(layer: Vec<u8>, reference: &Reference, platform: &Platform, epoch: u64) -> Self {
        let layer_digest = sha256(&layer);
        let created = rfc3339(epoch);
        let version = env!("CARGO_PKG_VERSION");
        let labels = HashMap::from([
            (
                "org.opencontainers.image.version".to_owned(),
                version.to_owned(),
            ),
            (
                "org.opencontainers.image.title".to_owned(),
                "graft-agent".to_owned(),
            ),
        ]);
        let config = ImageConfigurationBuilder::default()
            .architecture(Arch::from(platform.architecture.as_str()))
            .os(Os::from(platform.os.as_str()))
            .created(created.clone())
            .config(
                ConfigBuilder::default()
                    .entrypoint(vec![AGENT_PATH.to_owned()])
                    .env(vec![IMAGE_PATH_ENV.to_owned()])
                    .working_dir("/")
                    .labels(labels)
                    .build()
                    .expect("every field of the image's Config is set"),
            )
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![layer_digest.clone()])
                    .build()
                    .expect("every field of the image's RootFs is set"),
            )
            .history(vec![
                HistoryBuilder::default()
                    .created(created)
                    .created_by(format!("graft agent-image (graft {version})"))
                    .build()
                    .expect("every field of the image's History is set"),
            ])
            .build()
            .expect("every required field of the image configuration is set");
        let config = to_json(&config);
        let config_digest = sha256(&config);
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(descriptor(
                MediaType::ImageConfig,
                &config_digest,
                config.len(),
            ))
            .layers(vec![descriptor(
                MediaType::ImageLayer,
                &layer_digest,
                layer.len(),
            )])
            .build()
            .expect("every required field of the image manifest is set");
        let manifest = to_json(&manifest);
        let manifest_digest = sha256(&manifest);
        let mut manifest_descriptor =
            descriptor(MediaType::ImageManifest, &manifest_digest, manifest.len());
        manifest_descriptor.set_annotations(Some(HashMap::from([
            (
                "io.containerd.image.name".to_owned(),
                reference.name.clone(),
            ),
            (
                "org.opencontainers.image.ref.name".to_owned(),
                reference.tag.clone(),
            ),
        ])));
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![manifest_descriptor])
            .build()
            .expect("every required field of the image index is set");
        let index = to_json(&index);
        let docker_manifest = to_json(&[DockerManifest {
            config: blob_path(&config_digest),
            repo_tags: vec![reference.familiar.clone()],
            layers: vec![blob_path(&layer_digest)],
        }]);
        ImageBlobs {
            layer,
            layer_digest,
            config,
            config_digest,
            manifest,
            manifest_digest,
            index,
            docker_manifest,
        }
    }
}

/// One image of Docker's `manifest.json` (image spec v1.2, "Combined Image
/// JSON + Filesystem Changeset Format"), which `oci-spec` does not cover.
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    /// The config blob's path in the archive.
    config: String,
    /// The image's names, as Docker shows them.
    repo_tags: Vec<String>,
    /// The layer blobs' paths in the archive, lowest first.
    layers: Vec<String>,
}

/// A descriptor of the blob `digest` (`sha256:<hex>`) of `size` bytes.
fn descriptor(media_type: MediaType, digest: &str, size: usize) -> Descriptor {
    let digest = Digest::from_str(digest).expect("sha256() makes valid digests");
    Descriptor::new(media_type, size as u64, digest)
}

/// Writes the archive (OCI layout and `docker save` layout in one tar) to
/// `out`, entries sorted, owned by root, time stamps `mtime`.
pub fn write_archive<W: Write>(out: W, blobs: &ImageBlobs, mtime: u64) -> io::Result<W> {
    let mut entries: BTreeMap<String, &[u8]> = BTreeMap::new();
    for (digest, data) in [
        (&blobs.layer_digest, &blobs.layer),
        (&blobs.config_digest, &blobs.config),
        (&blobs.manifest_digest, &blobs.manifest),
    ] {
        entries.insert(blob_path(digest), data);
    }
    entries.insert("index.json".into(), &blobs.index);
    entries.insert("manifest.json".into(), &blobs.docker_manifest);
    entries.insert("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);

    let mut builder = tar::Builder::new(out);
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(0);
        builder.append_data(&mut header, dir, io::empty())?;
    }
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, name, data)?;
    }
    builder.into_inner()
}

/// `blobs/sha256/<hex>` for `sha256:<hex>`.
pub fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        graft_protocol::secret::hex(Sha256::digest(data))
    )
}

/// `value` as compact JSON with sorted object keys (through `serde_json`'s
/// `Value`, whose maps are ordered), so the same image gives the same bytes.
fn to_json(value: &impl serde::Serialize) -> Vec<u8> {
    let value = serde_json::to_value(value).expect("image JSON serializes");
    serde_json::to_vec(&value).expect("JSON values always serialize")
}

/// `epoch` seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC, RFC 3339), as the OCI image
/// config's `created` field wants it.
pub fn rfc3339(epoch: u64) -> String {
    i64::try_from(epoch)
        .ok()
        .and_then(|secs| jiff::Timestamp::from_second(secs).ok())
        .unwrap_or(jiff::Timestamp::MAX)
        .to_string()
}
