//! Checkpoints: safetensors files holding named f32 tensors plus string metadata, written
//! atomically (temporary file, fsync, rename, fsync of the folder), so a crash during a save
//! leaves the previous checkpoint intact and readable.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name prefix and suffix of checkpoints in a save folder: `ckpt_00001000.safetensors`.
const PREFIX: &str = "ckpt_";
const SUFFIX: &str = ".safetensors";
/// Identifies our layout; bumped if the meaning of names or metadata changes.
pub const FORMAT: &str = "slotfix-1";

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// name → (shape, values)
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: BTreeMap<String, String>,
}

impl Checkpoint {
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        self.tensors.insert(name.into(), (shape, values));
    }

    pub fn tensor(&self, name: &str) -> Result<&(Vec<usize>, Vec<f32>), String> {
        self.tensors
            .get(name)
            .ok_or_else(|| format!("checkpoint has no tensor `{name}`"))
    }

    pub fn meta(&self, key: &str) -> Result<&str, String> {
        self.meta
            .get(key)
            .map(|s| s.as_str())
            .ok_or_else(|| format!("checkpoint has no metadata `{key}`"))
    }

    /// Serialise to the bytes of a safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        // safetensors stores little-endian data; f32 slices are cast as they are in memory.
        const { assert!(cfg!(target_endian = "little")) };
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(n, (shape, v))| {
                TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(v))
                    .map(|t| (n.clone(), t))
                    .map_err(|e| format!("tensor {n}: {e:?}"))
            })
            .collect::<Result<_, _>>()?;
        let mut meta: HashMap<String, String> = self.meta.clone().into_iter().collect();
        meta.insert("format".into(), FORMAT.into());
        safetensors::serialize(views, &Some(meta))
            .map_err(|e| format!("serialising the checkpoint: {e:?}"))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| format!("not a valid safetensors file: {e:?}"))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| format!("bad header: {e:?}"))?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        match meta.get("format").map(|s| s.as_str()) {
            Some(FORMAT) => {}
            other => {
                return Err(format!(
                    "not a slotfix checkpoint (format {other:?}, expected {FORMAT:?})"
                ))
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(format!(
                    "tensor {name}: dtype {:?}, expected F32",
                    view.dtype()
                ));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Ok(Self { tensors, meta })
    }

    /// Read and parse a checkpoint; errors name the file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = fs::read(path)
            .map_err(|e| format!("cannot read checkpoint {}: {e}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Write atomically: `path` either keeps its old contents or has the complete new ones.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        write_atomic(path, &self.to_bytes()?, None)
    }
}

/// The checkpoint path for `step` in `dir`.
pub fn path_for_step(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{step:08}{SUFFIX}"))
}

/// Checkpoints in `dir` as (step, path), oldest first. Temporary files are not listed.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name
                .strip_prefix(PREFIX)?
                .strip_suffix(SUFFIX)?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest checkpoint of `dir` that loads; unreadable ones are reported in `skipped`.
pub fn latest_readable(dir: &Path, skipped: &mut Vec<String>) -> Option<(PathBuf, Checkpoint)> {
    for (_, path) in list(dir).into_iter().rev() {
        match Checkpoint::load(&path) {
            Ok(c) => return Some((path, c)),
            Err(e) => skipped.push(e),
        }
    }
    None
}

/// Delete all but the `keep` newest checkpoints of `dir` (never the one at `protect`).
pub fn prune(dir: &Path, keep: usize, protect: &Path) {
    let all = list(dir);
    let n = all.len();
    for (_, p) in all.into_iter().take(n.saturating_sub(keep)) {
        if p != protect {
            let _ = fs::remove_file(p);
        }
    }
}

/// Where a simulated crash stops [`write_atomic`] (tests): the two points before the rename, the
/// only step that makes new contents visible under the final name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// After writing this many bytes of the temporary file.
    MidWrite(usize),
    /// After the temporary file is complete and fsynced, before the rename.
    BeforeRename,
}

/// Write `bytes` to `path` through a temporary file in the same folder, fsync it, rename it over
/// `path` and fsync the folder. `crash` (tests only) stops at that point and returns an error,
/// leaving the files as a process killed there would.
pub fn write_atomic(path: &Path, bytes: &[u8], crash: Option<Crash>) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let io = |e: std::io::Error| format!("writing {}: {e}", tmp.display());
    let mut f = fs::File::create(&tmp).map_err(io)?;
    if let Some(Crash::MidWrite(n)) = crash {
        f.write_all(&bytes[..n.min(bytes.len())]).map_err(io)?;
        return Err(format!(
            "simulated crash after {n} bytes of {}",
            tmp.display()
        ));
    }
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    if crash == Some(Crash::BeforeRename) {
        return Err(format!("simulated crash before renaming {}", tmp.display()));
    }
    fs::rename(&tmp, path)
        .map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), path.display()))?;
    // Make the rename itself durable.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64) -> Checkpoint {
        let mut c = Checkpoint::default();
        c.insert(
            "encoder.convs.0.weight",
            vec![2, 3],
            vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 7.0],
        );
        c.insert("x", vec![1], vec![step as f32]);
        c.meta.insert("step".into(), step.to_string());
        c
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_for_step(dir.path(), 42);
        sample(42).save(&p).unwrap();
        let back = Checkpoint::load(&p).unwrap();
        assert_eq!(back.tensors, sample(42).tensors);
        assert_eq!(back.meta("step").unwrap(), "42");
        assert_eq!(back.meta("format").unwrap(), FORMAT);
    }

    #[test]
    fn crash_during_save_leaves_the_previous_checkpoint_readable() {
        let dir = tempfile::tempdir().unwrap();
        sample(100).save(&path_for_step(dir.path(), 100)).unwrap();
        // A save of step 200 dies half way through writing its temporary file; a save over the
        // file of step 100 dies after its temporary file is complete, just before the rename...
        let bytes = sample(200).to_bytes().unwrap();
        let half = Crash::MidWrite(bytes.len() / 2);
        let err = write_atomic(&path_for_step(dir.path(), 200), &bytes, Some(half)).unwrap_err();
        assert!(err.contains("simulated crash"));
        let p100 = path_for_step(dir.path(), 100);
        let before = fs::read(&p100).unwrap();
        let err = write_atomic(&p100, &bytes, Some(Crash::BeforeRename)).unwrap_err();
        assert!(err.contains("before renaming"));
        assert_eq!(
            fs::read(&p100).unwrap(),
            before,
            "the old file is untouched until the rename"
        );
        // ... and a truncated file under the final name (e.g. copied by hand) is skipped too.
        fs::write(path_for_step(dir.path(), 300), &bytes[..bytes.len() / 3]).unwrap();
        let mut skipped = Vec::new();
        let (path, c) = latest_readable(dir.path(), &mut skipped).expect("previous checkpoint");
        assert_eq!(path, path_for_step(dir.path(), 100));
        assert_eq!(c.meta("step").unwrap(), "100");
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("ckpt_00000300"), "{}", skipped[0]);
    }

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for s in [1, 2, 3, 4, 5] {
            sample(s).save(&path_for_step(dir.path(), s)).unwrap();
        }
        prune(dir.path(), 2, &path_for_step(dir.path(), 1));
        let steps: Vec<u64> = list(dir.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![1, 4, 5]);
    }

    #[test]
    fn foreign_files_are_rejected_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        fs::write(&p, b"not a checkpoint").unwrap();
        let e = Checkpoint::load(&p).unwrap_err();
        assert!(e.contains("x.safetensors"), "{e}");
        let e = Checkpoint::load(&dir.path().join("missing.safetensors")).unwrap_err();
        assert!(e.contains("missing.safetensors"), "{e}");
    }
}
