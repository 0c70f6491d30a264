//! Reading the files a user points sigrun at (pipeline specs, settings, the emulator's world):
//! regular files only — a device or a FIFO behind the path (`/dev/zero`, a symlink to one) is
//! refused rather than read until memory runs out — and no larger than a stated limit, checked
//! before and while reading.

use std::io::Read;
use std::path::Path;

/// The most a spec, a settings file or a world file may hold.
pub const MAX_INPUT_FILE_BYTES: u64 = 1024 * 1024;

/// Reads `path` as UTF-8 text, refusing what is not a regular file or is over `limit` bytes. The
/// error says which (without the path: the caller names it).
pub fn read_bounded(path: &Path, limit: u64) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file (a directory, device or pipe is not read)".into());
    }
    if meta.len() > limit {
        return Err(format!(
            "{} bytes is over the limit of {} ({limit} bytes)",
            meta.len(),
            human(limit)
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "over the limit of {} ({limit} bytes; it grew while read)",
            human(limit)
        ));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
}

/// A limit as people write it: `1 MiB`, `64 KiB`, or bytes.
fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_big_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_bounded(dir.path(), 10).unwrap_err().contains("not a regular file"));
        let link = dir.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_bounded(&link, 10).unwrap_err().contains("not a regular file"));
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "x".repeat(11)).unwrap();
        assert!(
            read_bounded(&big, 10)
                .unwrap_err()
                .contains("over the limit of 10 bytes")
        );
        assert_eq!(human(MAX_INPUT_FILE_BYTES), "1 MiB");
        assert_eq!(human(256 * 1024), "256 KiB");
        std::fs::write(&big, "name = 1").unwrap();
        assert_eq!(read_bounded(&big, 10).unwrap(), "name = 1");
        std::fs::write(&big, [0xff, 0xfe]).unwrap();
        assert!(read_bounded(&big, 10).unwrap_err().contains("UTF-8"));
    }
}
