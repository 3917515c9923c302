//! Parsing of `#[cached(...)]` options.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Ident, LitBool, LitInt, LitStr, Token};

const OPTIONS: &str = "profile, ttl, sliding, skip, name, version, local, cache_none, fail_safe, fail_safe_throttle, soft_timeout, eager_refresh";

pub(crate) enum Expiry {
    Ttl(u64),
    Sliding(u64),
}

#[derive(Default)]
pub(crate) struct Options {
    pub profile: Option<LitStr>,
    pub expiry: Option<(Expiry, Span)>,
    pub skip: Vec<Ident>,
    pub name: Option<LitStr>,
    pub version: Option<u32>,
    pub local: Option<Span>,
    pub cache_none: Option<(bool, Span)>,
    /// `fail_safe`, `fail_safe_throttle`, `soft_timeout`, in nanoseconds.
    pub fail_safe: Option<(u64, Span)>,
    pub fail_safe_throttle: Option<(u64, Span)>,
    pub soft_timeout: Option<(u64, Span)>,
    pub eager_refresh: Option<(f64, Span)>,
}

/// Collects every problem instead of stopping at the first one.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    pub fn add(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.push(syn::Error::new(span, msg));
    }
    pub fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

impl Parse for Options {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut opts = Options::default();
        let mut errors = Errors::default();
        let mut seen: Vec<String> = Vec::new();
        while !input.is_empty() {
            let key = Ident::parse_any(input)?;
            let name = key.to_string();
            if seen.contains(&name) {
                errors.add(
                    key.span(),
                    format!("option `{name}` is given twice; keep one"),
                );
            }
            seen.push(name.clone());
            match name.as_str() {
                "profile" => {
                    let lit = value::<LitStr>(
                        input,
                        &key,
                        "a profile name, as in `profile = \"catalog\"`",
                    )?;
                    if lit.value().is_empty() {
                        errors.add(lit.span(), "the profile name is empty; name a profile configured with `Profile::new(..)`, or remove the option to use \"default\"");
                    }
                    opts.profile = Some(lit);
                }
                "ttl" | "sliding" => {
                    let lit =
                        value::<LitStr>(input, &key, "a duration string, as in `ttl = \"10m\"`")?;
                    match parse_duration(&lit.value()) {
                        Ok(nanos) => {
                            if opts.expiry.is_some() {
                                errors.add(key.span(), "`ttl` and `sliding` cannot be combined: use `ttl` for expiry a fixed time after the value is stored, or `sliding` for expiry after a time without reads");
                            }
                            let e = if name == "ttl" {
                                Expiry::Ttl(nanos)
                            } else {
                                Expiry::Sliding(nanos)
                            };
                            opts.expiry = Some((e, key.span()));
                        }
                        Err(why) => errors.add(
                            lit.span(),
                            format!("invalid duration {:?}: {why}", lit.value()),
                        ),
                    }
                }
                "fail_safe" | "fail_safe_throttle" | "soft_timeout" => {
                    let example = match name.as_str() {
                        "fail_safe" => "`fail_safe = \"1h\"`",
                        "fail_safe_throttle" => "`fail_safe_throttle = \"30s\"`",
                        _ => "`soft_timeout = \"100ms\"`",
                    };
                    let lit = value::<LitStr>(
                        input,
                        &key,
                        &format!("a duration string, as in {example}"),
                    )?;
                    let slot = match name.as_str() {
                        "fail_safe" => &mut opts.fail_safe,
                        "fail_safe_throttle" => &mut opts.fail_safe_throttle,
                        _ => &mut opts.soft_timeout,
                    };
                    match parse_nanos(&lit.value()) {
                        Ok(0) => errors.add(
                            lit.span(),
                            match name.as_str() {
                                "fail_safe" => "a zero `fail_safe` keeps no fallback; remove the option to turn fail-safe off",
                                "fail_safe_throttle" => "a zero `fail_safe_throttle` would call a failing source on every call; give it at least a second",
                                _ => "a zero `soft_timeout` would never wait for the body; remove the option, or give it the time a fast answer takes",
                            },
                        ),
                        Ok(nanos) => *slot = Some((nanos, key.span())),
                        Err(why) => errors.add(
                            lit.span(),
                            format!("invalid duration {:?} for `{name}`: {why}", lit.value()),
                        ),
                    }
                }
                "eager_refresh" => {
                    const EXPECTED: &str =
                        "a fraction of the ttl between 0 and 1, as in `eager_refresh = 0.8`";
                    if !input.peek(Token![=]) {
                        return Err(syn::Error::new(
                            key.span(),
                            format!("`eager_refresh` needs a value: {EXPECTED}"),
                        ));
                    }
                    input.parse::<Token![=]>()?;
                    let lit: syn::Lit = input.parse().map_err(|e| {
                        syn::Error::new(e.span(), format!("`eager_refresh` expects {EXPECTED}"))
                    })?;
                    let fraction = match &lit {
                        syn::Lit::Float(f) => f.base10_parse::<f64>().ok(),
                        syn::Lit::Int(i) => i.base10_parse::<f64>().ok(),
                        _ => None,
                    };
                    match fraction {
                        Some(f) if f > 0.0 && f < 1.0 => {
                            opts.eager_refresh = Some((f, key.span()))
                        }
                        Some(f) => errors.add(
                            lit.span(),
                            format!("`eager_refresh = {f}` is outside 0 to 1 (exclusive): it is the fraction of the ttl after which a hit refreshes the entry in the background, as in `eager_refresh = 0.8`"),
                        ),
                        None => errors.add(lit.span(), format!("`eager_refresh` expects {EXPECTED}")),
                    }
                }
                "skip" => {
                    let content;
                    if !input.peek(syn::token::Paren) {
                        return Err(syn::Error::new(
                            key.span(),
                            "`skip` lists parameters, as in `skip(db, self)`",
                        ));
                    }
                    syn::parenthesized!(content in input);
                    let names = Punctuated::<Ident, Token![,]>::parse_terminated_with(
                        &content,
                        Ident::parse_any,
                    )?;
                    opts.skip.extend(names);
                }
                "name" => {
                    let lit = value::<LitStr>(
                        input,
                        &key,
                        "a key name, as in `name = \"catalog.product\"`",
                    )?;
                    let v = lit.value();
                    if v.is_empty()
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_:.-/".contains(c))
                    {
                        errors.add(lit.span(), "a key name may use ASCII letters, digits and `_ : . - /`, and must not be empty");
                    }
                    opts.name = Some(lit);
                }
                "version" => {
                    let lit = value::<LitInt>(input, &key, "a number, as in `version = 2`")?;
                    match lit.base10_parse::<u32>() {
                        Ok(v) => opts.version = Some(v),
                        Err(_) => errors.add(
                            lit.span(),
                            "`version` must be a whole number from 0 to 4294967295",
                        ),
                    }
                }
                "local" => {
                    if input.peek(Token![=]) {
                        return Err(syn::Error::new(
                            key.span(),
                            "`local` takes no value: write `local`",
                        ));
                    }
                    opts.local = Some(key.span());
                }
                "cache_none" => {
                    let lit = value::<LitBool>(
                        input,
                        &key,
                        "`true` or `false`, as in `cache_none = false`",
                    )?;
                    opts.cache_none = Some((lit.value, key.span()));
                }
                _ => {
                    errors.add(
                        key.span(),
                        format!("unknown option `{name}`; the options are: {OPTIONS}"),
                    );
                    // Skip its value so the remaining options are still checked.
                    if input.peek(Token![=]) {
                        input.parse::<Token![=]>()?;
                        input.parse::<syn::Expr>()?;
                    } else if input.peek(syn::token::Paren) {
                        let _content;
                        syn::parenthesized!(_content in input);
                    }
                }
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        if let Some((Expiry::Sliding(_), _)) = opts.expiry {
            if let Some((_, span)) = opts.fail_safe {
                errors.add(span, "`fail_safe` cannot be combined with `sliding`: fail-safe keeps an entry past a fixed expiry; use `ttl`");
            }
            if let Some((_, span)) = opts.eager_refresh {
                errors.add(span, "`eager_refresh` cannot be combined with `sliding`: it refreshes an entry before a fixed expiry; use `ttl`");
            }
        }
        errors.finish()?;
        Ok(opts)
    }
}

fn value<T: Parse>(input: ParseStream, key: &Ident, expected: &str) -> syn::Result<T> {
    if !input.peek(Token![=]) {
        return Err(syn::Error::new(
            key.span(),
            format!("`{key}` needs a value: {expected}"),
        ));
    }
    input.parse::<Token![=]>()?;
    input
        .parse::<T>()
        .map_err(|e| syn::Error::new(e.span(), format!("`{key}` expects {expected}")))
}

/// Parses `"10m"`, `"1h30m"`, `"250ms"` into nanoseconds; zero is refused (an
/// expiration of zero would never serve a hit).
pub(crate) fn parse_duration(s: &str) -> Result<u64, String> {
    match parse_nanos(s)? {
        0 => Err("a zero duration would never serve a hit; remove the option, or disable the profile to turn caching off".into()),
        n => Ok(n),
    }
}

/// Parses `"10m"`, `"1h30m"`, `"250ms"` into nanoseconds, zero included.
fn parse_nanos(s: &str) -> Result<u64, String> {
    const HINT: &str =
        "expected a number followed by a unit (ms, s, m, h, d), for example \"10m\" or \"1h30m\"";
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(HINT.into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(HINT.into());
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| "the number is too large".to_string())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let scale: u64 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "" => return Err(format!("`{n}` has no unit; {HINT}")),
            other => return Err(format!("unknown unit `{other}`; {HINT}")),
        };
        total = n
            .checked_mul(scale)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| "the duration is too long".to_string())?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(250_000_000));
        assert_eq!(parse_duration("10m"), Ok(600_000_000_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000_000_000));
        assert_eq!(parse_duration("2d"), Ok(172_800_000_000_000));
        for bad in [
            "",
            "10",
            "m",
            "10x",
            "1.5h",
            "0s",
            "99999999999999999999s",
            "10 m",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
