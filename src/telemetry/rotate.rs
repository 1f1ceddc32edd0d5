//! Slime's log rotation (`global.log.logRotate` / `logRotateConfig`): logs go to a file that is
//! rotated when it would exceed `maxSizeMB` — `slime.log` becomes `slime.log.1` (older backups
//! shift up, `.gz` when `compress`), at most `maxBackups` are kept and backups older than
//! `maxAgeDay` days are removed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::LogRotateConfig;

/// A log file that rotates itself.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_size: u64,
    max_backups: u32,
    max_age: Duration,
    compress: bool,
    file: File,
    size: u64,
}

impl RotatingFile {
    /// Opens (appending) the configured file, creating its directory.
    pub fn open(cfg: &LogRotateConfig) -> io::Result<Self> {
        let path = PathBuf::from(&cfg.file_path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            max_size: u64::from(cfg.max_size_mb) * 1024 * 1024,
            max_backups: cfg.max_backups,
            max_age: Duration::from_secs(u64::from(cfg.max_age_day) * 86_400),
            compress: cfg.compress,
            file,
            size,
        })
    }

    fn backup(&self, n: u32) -> PathBuf {
        let suffix = if self.compress { ".gz" } else { "" };
        PathBuf::from(format!("{}.{n}{suffix}", self.path.display()))
    }

    /// Moves the current file to backup 1 and starts a new one.
    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let _ = fs::remove_file(self.backup(self.max_backups));
        for n in (1..self.max_backups).rev() {
            let from = self.backup(n);
            if from.exists() {
                fs::rename(&from, self.backup(n + 1))?;
            }
        }
        if self.max_backups > 0 {
            if self.compress {
                gzip(&self.path, &self.backup(1))?;
                fs::remove_file(&self.path)?;
            } else {
                fs::rename(&self.path, self.backup(1))?;
            }
        } else {
            fs::remove_file(&self.path)?;
        }
        self.remove_old_backups();
        self.file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = 0;
        Ok(())
    }

    fn remove_old_backups(&self) {
        let now = SystemTime::now();
        for n in 1..=self.max_backups {
            let p = self.backup(n);
            let old = fs::metadata(&p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > self.max_age);
            if old {
                let _ = fs::remove_file(p);
            }
        }
    }
}

fn gzip(from: &Path, to: &Path) -> io::Result<()> {
    let mut encoder = flate2::write::GzEncoder::new(File::create(to)?, flate2::Compression::default());
    io::copy(&mut File::open(from)?, &mut encoder)?;
    encoder.finish()?.sync_all()
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_size {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn cfg(dir: &Path, compress: bool) -> LogRotateConfig {
        LogRotateConfig {
            file_path: dir.join("logs/slime.log").display().to_string(),
            max_size_mb: 1,
            max_backups: 2,
            max_age_day: 10,
            compress,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lazyload-rotate-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn rotates_by_size_and_keeps_max_backups() {
        let dir = tmp("plain");
        let mut f = RotatingFile::open(&cfg(&dir, false)).unwrap();
        let line = vec![b'x'; 400 * 1024];
        for _ in 0..8 {
            f.write_all(&line).unwrap();
        }
        let logs = dir.join("logs");
        assert!(logs.join("slime.log.1").exists() && logs.join("slime.log.2").exists());
        assert!(!logs.join("slime.log.3").exists(), "at most maxBackups");
        assert!(fs::metadata(logs.join("slime.log")).unwrap().len() <= 1024 * 1024);
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn compressed_backups_are_gzip() {
        let dir = tmp("gz");
        let mut f = RotatingFile::open(&cfg(&dir, true)).unwrap();
        f.write_all(&vec![b'a'; 700 * 1024]).unwrap();
        f.write_all(&vec![b'b'; 700 * 1024]).unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(dir.join("logs/slime.log.1.gz")).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.len(), 700 * 1024);
        assert!(text.bytes().all(|b| b == b'a'));
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn old_backups_are_removed() {
        let dir = tmp("age");
        let mut f = RotatingFile::open(&cfg(&dir, false)).unwrap();
        f.write_all(&vec![b'x'; 700 * 1024]).unwrap();
        f.write_all(&vec![b'x'; 700 * 1024]).unwrap();
        let backup = dir.join("logs/slime.log.1");
        let old = SystemTime::now() - Duration::from_secs(11 * 86_400);
        File::options()
            .write(true)
            .open(&backup)
            .unwrap()
            .set_modified(old)
            .unwrap();
        f.write_all(&vec![b'x'; 700 * 1024]).unwrap();
        // The old backup moved to .2 at this rotation, and was removed for its age.
        assert!(!dir.join("logs/slime.log.2").exists());
        assert!(dir.join("logs/slime.log.1").exists());
        fs::remove_dir_all(dir).ok();
    }
}
