//! Where checkpoints live: [`CheckpointRoot`] over an `object_store` backend,
//! the one I/O runtime, and the compare-and-swap that moves `latest`.
//!
//! # Compare-and-swap
//!
//! `latest` is the only object that is ever overwritten. Stores with
//! conditional writes (S3 and S3-compatible, GCS, Azure, memory) swap it with
//! `PutMode::Create` (when absent) or `PutMode::Update` with the etag/version
//! read before. `object_store`'s local filesystem does not implement
//! `PutMode::Update`; there the swap takes an exclusive `flock` on
//! `latest.lock` (across threads and processes), re-reads `latest`, compares,
//! writes a temporary file, fsyncs it, renames it over `latest` (atomic) and
//! fsyncs the directory. Both sit behind [`CheckpointRoot::compare_and_swap`];
//! the conformance suite races N writers over each.

use std::future::Future;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::error::{Error, Result};
use crate::failpoint;

/// Where the checkpoints of one job live.
///
/// URLs: `file:///abs/path` (or a plain path), `s3://bucket/prefix` (S3 and
/// S3-compatible; endpoint and credentials from the `AWS_*` environment,
/// path-style requests), `gs://bucket/prefix` (`GOOGLE_*` environment),
/// `az://container/prefix` (`AZURE_*` environment), and `memory://name/prefix`
/// (in-process; roots opened with the same name share one store).
#[derive(Clone)]
pub struct CheckpointRoot {
    inner: Arc<RootInner>,
}

struct RootInner {
    url: String,
    store: Arc<dyn ObjectStore>,
    /// Prefix of every key inside the store ("" or "a/b").
    prefix: String,
    /// The directory of a local-filesystem root: `latest` is swapped under a
    /// file lock there because the local store has no conditional update.
    local_dir: Option<PathBuf>,
}

impl std::fmt::Debug for CheckpointRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointRoot")
            .field("url", &self.inner.url)
            .finish()
    }
}

/// Where the checkpoints of job `job` go: `configured` (the spec's
/// `checkpoint.url`) when set, else the folder `checkpoints/{job}` under
/// `data_dir`, created, as its absolute `file://` URL (shared by the nodes of
/// a job only when `data_dir` is). `kiln run` and `kiln agent` both use it.
pub fn job_location(
    configured: Option<&str>,
    data_dir: &FsPath,
    job: &str,
) -> std::io::Result<String> {
    if let Some(url) = configured {
        return Ok(url.to_string());
    }
    let dir = data_dir.join("checkpoints").join(job);
    let with = |what: String| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    std::fs::create_dir_all(&dir).map_err(with(format!("create {}", dir.display())))?;
    let dir = dir
        .canonicalize()
        .map_err(with("resolve checkpoint folder".to_string()))?;
    Ok(format!("file://{}", dir.display()))
}

/// An object as a listing shows it (tools and GC only; loads never list).
#[derive(Debug, Clone)]
pub struct ListedObject {
    /// Key relative to the root.
    pub key: String,
    /// Stored bytes.
    pub size: u64,
    /// When the object was last written, as the store reports it; grace
    /// periods are measured from it.
    pub last_modified: chrono::DateTime<chrono::Utc>,
}

/// A value read together with what a conditional write needs to replace it.
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The bytes read.
    pub value: Bytes,
    version: UpdateVersion,
}

fn named_memory_stores() -> &'static Mutex<std::collections::HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<std::collections::HashMap<String, Arc<InMemory>>>> =
        OnceLock::new();
    STORES.get_or_init(Default::default)
}

fn trim_prefix(p: &str) -> String {
    p.trim_matches('/').to_string()
}

impl CheckpointRoot {
    /// Opens a root from a URL; configuration of cloud stores comes from the
    /// environment.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, std::iter::empty::<(String, String)>())
    }

    /// Opens a root with explicit store options (e.g. `aws_endpoint`,
    /// `aws_allow_http`, `aws_access_key_id`; the names of `object_store`'s
    /// config keys) on top of the environment.
    pub fn open_with<I, K, V>(url: &str, options: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r),
            None => ("file".to_string(), url),
        };
        let options: Vec<(String, String)> = options
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_ascii_lowercase(), v.into()))
            .collect();
        let bad_option = |k: &str, e: object_store::Error| {
            Error::invalid(format!("store option {k} for {url}: {e}"))
        };
        let build_err = |e: object_store::Error| Error::invalid(format!("open {url}: {e}"));
        // Cloud roots: `scheme://bucket/prefix`, the bucket in the builder.
        let cloud = |store: Arc<dyn ObjectStore>| {
            let prefix = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
            Self::from_parts(
                url.trim_end_matches('/').to_string(),
                store,
                &trim_prefix(prefix),
                None,
            )
        };
        match scheme.as_str() {
            "file" => {
                let path = PathBuf::from(rest);
                let path = std::path::absolute(&path).map_err(|source| Error::Io {
                    op: "resolve",
                    path: rest.to_string(),
                    source,
                })?;
                std::fs::create_dir_all(&path).map_err(|source| Error::Io {
                    op: "create directory",
                    path: path.display().to_string(),
                    source,
                })?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&path)
                    .map_err(build_err)?
                    .with_fsync(true);
                let shown = path.display().to_string();
                Ok(Self::from_parts(
                    format!("file://{}", shown.trim_end_matches('/')),
                    Arc::new(store),
                    "",
                    Some(path),
                ))
            }
            "memory" => {
                let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let store: Arc<dyn ObjectStore> = if name.is_empty() {
                    Arc::new(InMemory::new())
                } else {
                    let mut stores = named_memory_stores().lock().expect("memory store registry");
                    stores
                        .entry(name.to_string())
                        .or_insert_with(|| Arc::new(InMemory::new()))
                        .clone()
                };
                Ok(Self::from_parts(
                    url.trim_end_matches('/').to_string(),
                    store,
                    &trim_prefix(prefix),
                    None,
                ))
            }
            "s3" | "s3a" => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let bucket = rest.split('/').next().unwrap_or_default();
                let mut b = AmazonS3Builder::from_env().with_url(format!("s3://{bucket}"));
                for (k, v) in &options {
                    let key: AmazonS3ConfigKey = k.parse().map_err(|e| bad_option(k, e))?;
                    b = b.with_config(key, v.clone());
                }
                Ok(cloud(Arc::new(b.build().map_err(build_err)?)))
            }
            "gs" => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                let bucket = rest.split('/').next().unwrap_or_default();
                let mut b =
                    GoogleCloudStorageBuilder::from_env().with_url(format!("gs://{bucket}"));
                for (k, v) in &options {
                    let key: GoogleConfigKey = k.parse().map_err(|e| bad_option(k, e))?;
                    b = b.with_config(key, v.clone());
                }
                Ok(cloud(Arc::new(b.build().map_err(build_err)?)))
            }
            "az" | "azure" | "abfs" | "abfss" => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let container = rest.split('/').next().unwrap_or_default();
                let mut b = MicrosoftAzureBuilder::from_env().with_url(format!("az://{container}"));
                for (k, v) in &options {
                    let key: AzureConfigKey = k.parse().map_err(|e| bad_option(k, e))?;
                    b = b.with_config(key, v.clone());
                }
                Ok(cloud(Arc::new(b.build().map_err(build_err)?)))
            }
            other => Err(Error::invalid(format!(
                "checkpoint root {url}: unknown scheme {other} (file, s3, gs, az, memory)"
            ))),
        }
    }

    /// Wraps an existing store (fault injection, custom backends). `latest`
    /// is swapped with conditional puts, so the store must support
    /// `PutMode::Update`.
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Self {
        Self::from_parts(url.to_string(), store, &trim_prefix(prefix), None)
    }

    fn from_parts(
        url: String,
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        local_dir: Option<PathBuf>,
    ) -> Self {
        CheckpointRoot {
            inner: Arc::new(RootInner {
                url,
                store,
                prefix: prefix.to_string(),
                local_dir,
            }),
        }
    }

    /// The root's URL (a `file://` root's path made absolute): what
    /// [`CheckpointRoot::url_of`] puts before a key.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The store underneath; its paths include the root's prefix
    /// ([`CheckpointRoot::path`]).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.inner.store.clone()
    }

    /// The local directory of a `file://` root.
    pub fn local_dir(&self) -> Option<&FsPath> {
        self.inner.local_dir.as_deref()
    }

    /// The URL of an object of this root.
    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{}", self.inner.url, key)
    }

    /// The store path of a key relative to the root.
    pub fn path(&self, key: &str) -> Path {
        if self.inner.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.inner.prefix))
        }
    }

    fn key_of(&self, path: &Path) -> Option<String> {
        let p = path.as_ref();
        if self.inner.prefix.is_empty() {
            Some(p.to_string())
        } else {
            p.strip_prefix(self.inner.prefix.as_str())
                .and_then(|r| r.strip_prefix('/'))
                .map(str::to_string)
        }
    }

    // ----- async operations (run on the I/O runtime) -----

    /// The whole object at `key`; [`Error::NotFound`] when there is none.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let store = &self.inner.store;
        let r = store
            .get(&self.path(key))
            .await
            .map_err(|e| Error::store("get", key, e))?;
        r.bytes().await.map_err(|e| Error::store("read", key, e))
    }

    /// `None` when the object does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.get(key).await {
            Ok(b) => Ok(Some(b)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Bytes `range` of the object at `key`.
    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.inner
            .store
            .get_range(&self.path(key), range)
            .await
            .map_err(|e| Error::store("get range", key, e))
    }

    /// Writes `bytes` at `key`. With [`PutMode::Create`] an existing object
    /// is [`Error::AlreadyExists`]; with [`PutMode::Update`] a changed one is
    /// [`Error::Conflict`].
    pub async fn put(&self, key: &str, bytes: Bytes, mode: PutMode) -> Result<()> {
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.inner
            .store
            .put_opts(&self.path(key), PutPayload::from(bytes), opts)
            .await
            .map_err(|e| Error::store("put", key, e))?;
        Ok(())
    }

    /// Writes a raw chunk frame given as its header and body (see
    /// [`crate::codec::raw_frame_header`]). On a local root the frame goes
    /// to disk straight from `body` with `O_DIRECT` (no copy when the body
    /// is laid out for it, see `crate::direct::put_framed`); elsewhere, or
    /// where the filesystem refuses direct I/O, it is assembled (on a
    /// blocking thread) and written as [`Self::put_object`] does.
    pub(crate) async fn put_frame_parts<B>(
        &self,
        key: &str,
        header: [u8; crate::codec::HEADER_LEN],
        body: B,
        multipart_threshold: usize,
        part_bytes: usize,
    ) -> Result<()>
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        let local = self.inner.local_dir.as_ref().map(|dir| dir.join(key));
        let frame = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Bytes>> {
            #[cfg(target_os = "linux")]
            if let Some(path) = &local
                && crate::direct::put_framed(path, &header, body.as_ref())?
            {
                return Ok(None);
            }
            #[cfg(not(target_os = "linux"))]
            let _ = &local;
            let body = body.as_ref();
            let mut frame = Vec::with_capacity(header.len() + body.len());
            frame.extend_from_slice(&header);
            frame.extend_from_slice(body);
            Ok(Some(Bytes::from(frame)))
        })
        .await
        .map_err(|e| Error::Cancelled {
            what: format!("direct write of {key}: {e}"),
        })?
        .map_err(|source| Error::Io {
            op: "write",
            path: self.url_of(key),
            source,
        })?;
        match frame {
            None => Ok(()),
            Some(frame) => {
                self.put_buffered_object(key, frame, multipart_threshold, part_bytes)
                    .await
            }
        }
    }

    /// Writes an immutable object, as a multipart upload when it is larger
    /// than `multipart_threshold` (parts of `part_bytes`, uploaded at once);
    /// on a local root, past the page cache where the filesystem allows it.
    pub async fn put_object(
        &self,
        key: &str,
        bytes: Bytes,
        multipart_threshold: usize,
        part_bytes: usize,
    ) -> Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(dir) = &self.inner.local_dir {
            // Immutable chunks skip the page cache (see `crate::direct`).
            let path = dir.join(key);
            let (target, body) = (path.clone(), bytes.clone());
            let written = tokio::task::spawn_blocking(move || crate::direct::put(&target, &body))
                .await
                .map_err(|e| Error::Cancelled {
                    what: format!("direct write of {key}: {e}"),
                })?;
            match written {
                Ok(true) => return Ok(()),
                Ok(false) => {} // no direct I/O here: the buffered path below
                Err(source) => {
                    return Err(Error::Io {
                        op: "write",
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        }
        self.put_buffered_object(key, bytes, multipart_threshold, part_bytes)
            .await
    }

    /// [`Self::put_object`] through `object_store`, without the local
    /// direct-write path.
    async fn put_buffered_object(
        &self,
        key: &str,
        bytes: Bytes,
        multipart_threshold: usize,
        part_bytes: usize,
    ) -> Result<()> {
        if bytes.len() <= multipart_threshold {
            return self.put(key, bytes, PutMode::Overwrite).await;
        }
        let path = self.path(key);
        let mut upload = self
            .inner
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| Error::store("start multipart upload", key, e))?;
        // S3 wants parts of at least 5 MiB (but the last) and at most 10000.
        let part = part_bytes.max(5 << 20).max(bytes.len().div_ceil(10_000));
        let mut uploads = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            let end = (offset + part).min(bytes.len());
            uploads.push(upload.put_part(PutPayload::from(bytes.slice(offset..end))));
            offset = end;
        }
        let result = futures::future::try_join_all(uploads).await;
        let result = match result {
            Ok(_) => upload.complete().await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            if let Err(abort) = upload.abort().await {
                tracing::warn!(key, error = %abort, "abort multipart upload");
            }
            return Err(Error::store("multipart upload", key, e));
        }
        Ok(())
    }

    /// Deletes an object; a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store("delete", key, e)),
        }
    }

    /// Lists every object under `prefix` (a key prefix ending at a `/`
    /// boundary, e.g. `manifests`). Tools and GC only.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ListedObject>> {
        let path = self.path(prefix);
        let metas: Vec<_> = self
            .inner
            .store
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|e| Error::store("list", prefix, e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                Some(ListedObject {
                    key: self.key_of(&m.location)?,
                    size: m.size,
                    last_modified: m.last_modified,
                })
            })
            .collect())
    }

    /// The names of the "folders" directly under `prefix` (one delimiter
    /// listing, not a walk of everything below): the registry's model names.
    pub async fn list_children(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.path(prefix);
        let listing = self
            .inner
            .store
            .list_with_delimiter(Some(&path))
            .await
            .map_err(|e| Error::store("list", prefix, e))?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Reads `key` with what a later [`Self::compare_and_swap`] needs.
    pub async fn read_versioned(&self, key: &str) -> Result<Option<Versioned>> {
        if let Some(dir) = &self.inner.local_dir {
            let path = dir.join(key);
            return match std::fs::read(&path) {
                Ok(v) => Ok(Some(Versioned {
                    value: Bytes::from(v),
                    version: UpdateVersion {
                        e_tag: None,
                        version: None,
                    },
                })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(Error::Io {
                    op: "read",
                    path: path.display().to_string(),
                    source,
                }),
            };
        }
        match self.inner.store.get(&self.path(key)).await {
            Ok(r) => {
                let version = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let value = r.bytes().await.map_err(|e| Error::store("read", key, e))?;
                Ok(Some(Versioned { value, version }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::store("get", key, e)),
        }
    }

    /// Replaces `key` with `new` if it still holds `expected` (absent when
    /// `None`). `Ok(false)`: someone else changed it first; re-read and decide
    /// again.
    ///
    /// Every write must carry a value no other writer would write (the
    /// `latest` record names its manifest and commit time): on stores with
    /// conditional puts a request retried after a lost response fails its
    /// precondition although the first try succeeded, and finding exactly our
    /// value in place is how that case counts as a success.
    pub async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&Versioned>,
        new: Bytes,
    ) -> Result<bool> {
        if let Some(dir) = self.inner.local_dir.clone() {
            let key = key.to_string();
            let expected = expected.map(|v| v.value.clone());
            return tokio::task::spawn_blocking(move || {
                local_compare_and_swap(&dir, &key, expected.as_deref(), &new)
            })
            .await
            .map_err(|e| Error::Cancelled {
                what: format!("local compare-and-swap: {e}"),
            })?;
        }
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(v.version.clone()),
        };
        failpoint::hit("during-latest");
        match self.put(key, new.clone(), mode).await {
            Ok(()) => Ok(true),
            Err(Error::AlreadyExists { .. } | Error::Conflict { .. }) => {
                // A retried request may have succeeded the first time: if
                // the object now holds exactly our value, the swap happened.
                let now = self.read_versioned(key).await?;
                Ok(now.is_some_and(|v| v.value == new))
            }
            Err(e) => Err(e),
        }
    }
}

fn io_error(op: &'static str, path: &FsPath, source: std::io::Error) -> Error {
    Error::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// The name an object `name` is written under on a local root before it is
/// renamed into place: `{name}#{digits}`, `object_store`'s own staging
/// convention, which its listings skip.
pub(crate) fn staging_name(name: &str, id: u64) -> String {
    format!("{name}#{id}")
}

/// Whether a local file name is a [`staging_name`] (a write in progress, or
/// one a crash cut short).
pub(crate) fn is_staging_name(name: &str) -> bool {
    name.split_once('#')
        .is_some_and(|(_, id)| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// The local filesystem's swap: flock, re-read, compare, write a temporary
/// file, fsync, rename, fsync the directory.
fn local_compare_and_swap(
    dir: &FsPath,
    key: &str,
    expected: Option<&[u8]>,
    new: &[u8],
) -> Result<bool> {
    use std::io::Write;
    static TMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let target = dir.join(key);
    // Nested keys (the registry's `models/{name}/aliases/{alias}.json`): the
    // lock and the temporary file sit beside the target, in its folder.
    let folder = target.parent().unwrap_or(dir).to_path_buf();
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::invalid(format!("compare-and-swap key {key:?} names no file")))?;
    std::fs::create_dir_all(&folder).map_err(|e| io_error("create directory", &folder, e))?;
    let lock_path = folder.join(format!("{file_name}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_error("open lock", &lock_path, e))?;
    lock.lock().map_err(|e| io_error("lock", &lock_path, e))?;
    let current = match std::fs::read(&target) {
        Ok(v) => Some(v),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error("read", &target, e)),
    };
    if current.as_deref() != expected {
        return Ok(false);
    }
    let n = TMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = folder.join(format!(".{file_name}.tmp.{}.{n}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(new)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error("write", &tmp, e));
    }
    failpoint::hit("during-latest");
    if let Err(e) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error("rename", &target, e));
    }
    std::fs::File::open(&folder)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync directory", &folder, e))?;
    drop(lock);
    Ok(true)
}

/// The process-wide I/O runtime. One runtime, never dropped: `object_store`'s
/// HTTP clients pool connections whose tasks live on the runtime that opened
/// them, so a per-call or per-checkpointer runtime that is later dropped would
/// leave dead connections in a store shared by others.
pub(crate) fn io_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("kiln-ckpt-io")
            .enable_all()
            .build()
            .expect("build the checkpoint I/O runtime")
    })
}

/// Runs `f` to completion on the I/O runtime from blocking code; from inside
/// another tokio runtime it blocks on a helper thread instead of panicking.
pub(crate) fn block_on<F>(f: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(|| io_runtime().block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    } else {
        io_runtime().block_on(f)
    }
}
