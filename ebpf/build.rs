//! Compiles the kernel programs (C) with clang for the BPF target and leaves
//! the object in OUT_DIR, where `src/lib.rs` embeds it; then generates
//! `meshbypass_maps.rs` in OUT_DIR from the header (every `#define MB_*`
//! and `enum mb_counter`), which `src/abi.rs` includes: the numbers the
//! Rust side uses are the header's, never a copy.

use std::{
    collections::BTreeMap,
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The header every map and struct is defined in.
const HEADER: &str = "meshbypass_maps.h";
/// The enums of the header whose values the Rust side mirrors.
const ENUMS: [&str; 1] = ["mb_counter"];

fn main() -> anyhow::Result<()> {
    let clang = Clang::from_env()?;
    println!("cargo:rerun-if-changed={}", clang.src.display());
    println!("cargo:rerun-if-changed={}", clang.header().display());
    println!("cargo:rerun-if-env-changed=MESHBYPASS_CLANG");

    let obj = clang.out.join("meshbypass.bpf.o");
    clang.compile(&obj)?;

    let defines = clang.preprocess(&["-dM"])?;
    let expanded = clang.preprocess(&["-P"])?;
    let constants = header_constants(&defines, &expanded)?;
    let generated = clang.out.join("meshbypass_maps.rs");
    fs::write(&generated, render(&constants, &structs(&expanded)))
        .with_context(|| format!("writing {}", generated.display()))?;
    Ok(())
}

/// clang, the C sources and where its output goes.
struct Clang {
    exe: String,
    src: PathBuf,
    include: PathBuf,
    /// uapi headers include <asm/types.h>, which Debian keeps under the
    /// multiarch directory of the build host.
    multiarch: PathBuf,
    out: PathBuf,
}

impl Clang {
    fn from_env() -> anyhow::Result<Self> {
        let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
        Ok(Self {
            exe: env::var("MESHBYPASS_CLANG").unwrap_or_else(|_| "clang".to_owned()),
            src: manifest.join("bpf/meshbypass.bpf.c"),
            include: manifest.join("bpf/include"),
            multiarch: PathBuf::from(format!("/usr/include/{}-linux-gnu", env::consts::ARCH)),
            out: PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?),
        })
    }

    fn header(&self) -> PathBuf {
        self.include.join(HEADER)
    }

    /// clang for the BPF target with our include paths.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(["-target", "bpf"])
            .arg("-I")
            .arg(&self.include)
            .arg("-I")
            .arg(&self.multiarch);
        cmd
    }

    fn compile(&self, obj: &Path) -> anyhow::Result<()> {
        let status = self
            .command()
            .args(["-O2", "-g", "-Wall", "-Werror", "-c"])
            .arg(&self.src)
            .arg("-o")
            .arg(obj)
            .status()
            .with_context(|| self.cannot_run())?;
        if !status.success() {
            bail!("{} failed to compile {} ({status})", self.exe, self.src.display());
        }
        Ok(())
    }

    /// The header run through the preprocessor with `flags` (`-dM`: the
    /// macros; `-P`: the expanded text).
    fn preprocess(&self, flags: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command()
            .arg("-E")
            .args(flags)
            .arg(self.header())
            .output()
            .with_context(|| self.cannot_run())?;
        if !out.status.success() {
            bail!(
                "{} failed to preprocess {} ({}): {}",
                self.exe,
                self.header().display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8(out.stdout).context("the preprocessed header is not UTF-8")
    }

    fn cannot_run(&self) -> String {
        format!(
            "cannot run {}: install clang, libbpf-dev and linux-libc-dev (scripts/deps.sh)",
            self.exe
        )
    }
}

/// One number of the header, under its C name.
struct Constant {
    name: String,
    value: u32,
    /// The enum it belongs to; `None` for a `#define`.
    within: Option<&'static str>,
}

/// Every object-like `#define MB_*` (from `-dM` output) and every
/// enumerator of [`ENUMS`] (from the expanded header), evaluated.
fn header_constants(defines: &str, expanded: &str) -> anyhow::Result<Vec<Constant>> {
    let mut known = BTreeMap::new();
    let mut out = Vec::new();
    let mut macros: Vec<(&str, &str)> = defines
        .lines()
        .filter_map(|l| l.strip_prefix("#define "))
        .filter_map(|l| l.split_once(' '))
        // Function-like macros (`MB_X(a)`) are code, not numbers.
        .filter(|(name, _)| name.starts_with("MB_") && !name.contains('('))
        .collect();
    macros.sort();
    // A macro may use one that sorts after it: evaluate in rounds until
    // every one is known, or a round makes no progress.
    while !macros.is_empty() {
        let before = macros.len();
        let mut failed = None;
        macros.retain(|&(name, body)| match eval(body, &known) {
            Ok(value) => {
                known.insert(name.to_owned(), value);
                out.push(Constant {
                    name: name.to_owned(),
                    value,
                    within: None,
                });
                false
            }
            Err(e) => {
                failed.get_or_insert(e.context(format!("#define {name} {body}")));
                true
            }
        });
        if let Some(e) = failed
            && macros.len() == before
        {
            return Err(e);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    for within in ENUMS {
        let mut next = 0;
        for (name, body) in enumerators(expanded, within)? {
            let value = match body {
                Some(body) => {
                    eval(body, &known).with_context(|| format!("enum {within}: {name} = {body}"))?
                }
                None => next,
            };
            next = value + 1;
            known.insert(name.to_owned(), value);
            out.push(Constant {
                name: name.to_owned(),
                value,
                within: Some(within),
            });
        }
    }
    Ok(out)
}

/// The names of the structs the header defines (`struct mb_x {`).
fn structs(expanded: &str) -> Vec<&str> {
    expanded
        .split("struct ")
        .skip(1)
        .filter_map(|rest| rest.split_once('{'))
        .map(|(name, _)| name.trim())
        .filter(|name| name.starts_with("mb_") && !name.contains(char::is_whitespace))
        .collect()
}

/// `NAME [= value]` of each enumerator of `enum <within> { ... };`.
fn enumerators<'a>(expanded: &'a str, within: &str) -> anyhow::Result<Vec<(&'a str, Option<&'a str>)>> {
    let open = format!("enum {within} {{");
    let start = expanded
        .find(&open)
        .with_context(|| format!("{HEADER} has no `{open}`"))?
        + open.len();
    let body = &expanded[start..];
    let body = &body[..body
        .find('}')
        .with_context(|| format!("enum {within} is not closed"))?];
    Ok(body
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim())),
            None => (e, None),
        })
        .collect())
}

/// Evaluates a constant expression of the header: integer literals
/// (decimal or hex, `u`/`l` suffixes), names defined before, parentheses,
/// `+`, `<<` and `|`. Anything else fails the build, naming the line.
fn eval(expr: &str, known: &BTreeMap<String, u32>) -> anyhow::Result<u32> {
    let tokens = tokenize(expr)?;
    let mut parser = Parser {
        tokens: &tokens,
        at: 0,
        known,
    };
    let value = parser.or()?;
    if parser.at != tokens.len() {
        bail!("unexpected {:?}", tokens[parser.at]);
    }
    u32::try_from(value).context("does not fit in 32 bits")
}

fn tokenize(expr: &str) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::new();
    let mut rest = expr.trim_start();
    while let Some(c) = rest.chars().next() {
        let len = if c.is_ascii_alphanumeric() || c == '_' {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())
        } else if rest.starts_with("<<") {
            2
        } else if "()|+".contains(c) {
            1
        } else {
            bail!("unsupported character {c:?}");
        };
        tokens.push(rest[..len].to_owned());
        rest = rest[len..].trim_start();
    }
    Ok(tokens)
}

/// or := shift ('|' shift)*; shift := sum ('<<' sum)*; sum := atom ('+' atom)*
struct Parser<'a> {
    tokens: &'a [String],
    at: usize,
    known: &'a BTreeMap<String, u32>,
}

impl Parser<'_> {
    fn eat(&mut self, token: &str) -> bool {
        let hit = self.tokens.get(self.at).is_some_and(|t| t == token);
        self.at += usize::from(hit);
        hit
    }

    fn or(&mut self) -> anyhow::Result<u64> {
        let mut v = self.shift()?;
        while self.eat("|") {
            v |= self.shift()?;
        }
        Ok(v)
    }

    fn shift(&mut self) -> anyhow::Result<u64> {
        let mut v = self.sum()?;
        while self.eat("<<") {
            let by = u32::try_from(self.sum()?).context("shift too large")?;
            v = v.checked_shl(by).context("shift too large")?;
        }
        Ok(v)
    }

    fn sum(&mut self) -> anyhow::Result<u64> {
        let mut v = self.atom()?;
        while self.eat("+") {
            v = v.checked_add(self.atom()?).context("overflow")?;
        }
        Ok(v)
    }

    fn atom(&mut self) -> anyhow::Result<u64> {
        if self.eat("(") {
            let v = self.or()?;
            if !self.eat(")") {
                bail!("unbalanced parentheses");
            }
            return Ok(v);
        }
        let token = self.tokens.get(self.at).context("missing operand")?;
        self.at += 1;
        if let Some(v) = self.known.get(token) {
            return Ok(u64::from(*v));
        }
        let digits = token.trim_end_matches(['u', 'U', 'l', 'L']);
        let parsed = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => digits.parse(),
        };
        parsed.with_context(|| format!("{token:?} is neither a number nor a name defined before"))
    }
}

fn render(constants: &[Constant], structs: &[&str]) -> String {
    let mut out = format!(
        "// Generated by ebpf/build.rs from bpf/include/{HEADER}: do not edit.\n\
         // Every `#define MB_*` and the enumerators of {}, under their C names.\n\n",
        ENUMS.map(|e| format!("`enum {e}`")).join(", ")
    );
    for c in constants {
        let what = c
            .within
            .map_or_else(|| "#define".to_owned(), |e| format!("enum {e}"));
        out.push_str(&format!(
            "/// `{}` ({what}).\npub const {}: u32 = {};\n",
            c.name, c.name, c.value
        ));
    }
    out.push_str("\n/// Every constant above: (C name, value).\npub const ALL: &[(&str, u32)] = &[\n");
    for c in constants {
        out.push_str(&format!("    ({:?}, {}),\n", c.name, c.name));
    }
    out.push_str("];\n");
    out.push_str(&format!(
        "\n/// The structs the header defines, each mirrored in abi.rs.\npub const STRUCTS: &[&str] = &{structs:?};\n"
    ));
    out
}
