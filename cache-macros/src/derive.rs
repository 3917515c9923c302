//! `#[derive(CacheKey)]`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{parse_quote, Data, DeriveInput, Fields};

pub(crate) fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let name = &input.ident;
    let name_str = name.to_string();
    let body = match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(f) => {
                let writes = f.named.iter().map(|field| {
                    let id = field.ident.as_ref().expect("named field");
                    let fname = id.to_string();
                    quote! {
                        __w.field(#fname);
                        ::cache_runtime::CacheKey::write_key(&self.#id, __w);
                    }
                });
                quote! {
                    __w.begin_struct(#name_str);
                    #(#writes)*
                    __w.end();
                }
            }
            Fields::Unnamed(f) => {
                let writes = (0..f.unnamed.len()).map(|i| {
                    let idx = syn::Index::from(i);
                    quote!(::cache_runtime::CacheKey::write_key(&self.#idx, __w);)
                });
                quote! {
                    __w.begin_tuple_struct(#name_str);
                    #(#writes)*
                    __w.end();
                }
            }
            Fields::Unit => quote!(__w.write_unit_struct(#name_str);),
        },
        Data::Enum(e) => {
            let arms = e.variants.iter().map(|v| {
                let vid = &v.ident;
                let vname = vid.to_string();
                match &v.fields {
                    Fields::Unit => quote! {
                        Self::#vid => __w.write_unit_variant(#name_str, #vname),
                    },
                    Fields::Unnamed(f) => {
                        let binds: Vec<_> = (0..f.unnamed.len()).map(|i| format_ident!("__f{}", i)).collect();
                        quote! {
                            Self::#vid(#(#binds),*) => {
                                __w.begin_tuple_variant(#name_str, #vname);
                                #(::cache_runtime::CacheKey::write_key(#binds, __w);)*
                                __w.end();
                            }
                        }
                    }
                    Fields::Named(f) => {
                        let ids: Vec<_> = f.named.iter().map(|f| f.ident.clone().expect("named field")).collect();
                        let names = ids.iter().map(|i| i.to_string());
                        quote! {
                            Self::#vid { #(#ids),* } => {
                                __w.begin_struct_variant(#name_str, #vname);
                                #(
                                    __w.field(#names);
                                    ::cache_runtime::CacheKey::write_key(#ids, __w);
                                )*
                                __w.end();
                            }
                        }
                    }
                }
            });
            if e.variants.is_empty() {
                quote!(match *self {})
            } else {
                quote!(match self { #(#arms)* })
            }
        }
        Data::Union(u) => {
            return Err(syn::Error::new(
                u.union_token.span,
                "`CacheKey` cannot be derived for a union: which field is set is not known; implement `CacheKey` by hand",
            ))
        }
    };

    let mut generics = input.generics.clone();
    for tp in generics.type_params_mut() {
        tp.bounds.push(parse_quote!(::cache_runtime::CacheKey));
    }
    let (impl_g, ty_g, where_g) = generics.split_for_impl();
    Ok(quote! {
        impl #impl_g ::cache_runtime::CacheKey for #name #ty_g #where_g {
            fn write_key(&self, __w: &mut ::cache_runtime::KeyWriter) {
                #body
            }
        }
    })
}
