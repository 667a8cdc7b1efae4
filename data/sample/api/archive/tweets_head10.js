window.YTD.tweets.part0 = [
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1582825767519809536"
          ],
          "editableUntil" : "2022-10-19T20:37:25.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : false
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"http://twitter.com/#!/download/ipad\" rel=\"nofollow\">Twitter for iPad</a>",
      "entities" : {
        "hashtags" : [ ],
        "symbols" : [ ],
        "user_mentions" : [
          {
            "name" : "Sharon Machlis also @smach@fosstodon.org",
            "screen_name" : "sharon000",
            "indices" : [
              "0",
              "10"
            ],
            "id_str" : "10915042",
            "id" : "10915042"
          },
          {
            "name" : "Lorenz Walthert",
            "screen_name" : "lorenzwalthert",
            "indices" : [
              "11",
              "26"
            ],
            "id_str" : "710207495734751232",
            "id" : "710207495734751232"
          },
          {
            "name" : "Kirill Müller 🇺🇦",
            "screen_name" : "krlmlr",
            "indices" : [
              "27",
              "34"
            ],
            "id_str" : "3354999513",
            "id" : "3354999513"
          }
        ],
        "urls" : [ ]
      },
      "display_text_range" : [
        "0",
        "67"
      ],
      "favorite_count" : "1",
      "in_reply_to_status_id_str" : "1582702502297755653",
      "id_str" : "1582825767519809536",
      "in_reply_to_user_id" : "10915042",
      "truncated" : false,
      "retweet_count" : "0",
      "id" : "1582825767519809536",
      "in_reply_to_status_id" : "1582702502297755653",
      "created_at" : "Wed Oct 19 20:07:25 +0000 2022",
      "favorited" : false,
      "full_text" : "@sharon000 @lorenzwalthert @krlmlr Does it work OK with .qmd files?",
      "lang" : "en",
      "in_reply_to_screen_name" : "sharon000",
      "in_reply_to_user_id_str" : "10915042"
    }
  },
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1580696888344707072"
          ],
          "editableUntil" : "2022-10-13T23:38:00.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : true
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"https://mobile.twitter.com\" rel=\"nofollow\">Twitter Web App</a>",
      "entities" : {
        "hashtags" : [
          {
            "text" : "quartopub",
            "indices" : [
              "20",
              "30"
            ]
          },
          {
            "text" : "GoogleDocs",
            "indices" : [
              "34",
              "45"
            ]
          },
          {
            "text" : "googledrive",
            "indices" : [
              "109",
              "121"
            ]
          }
        ],
        "symbols" : [ ],
        "user_mentions" : [ ],
        "urls" : [ ]
      },
      "display_text_range" : [
        "0",
        "123"
      ],
      "favorite_count" : "1",
      "id_str" : "1580696888344707072",
      "truncated" : false,
      "retweet_count" : "1",
      "id" : "1580696888344707072",
      "created_at" : "Thu Oct 13 23:08:00 +0000 2022",
      "favorited" : false,
      "full_text" : "Best way to go from #quartopub to #GoogleDocs (that I can find) is to generate a .docx file and drop it into #googledrive .",
      "lang" : "en"
    }
  },
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1552679756239441920"
          ],
          "editableUntil" : "2022-07-28T16:07:55.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : true
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"http://twitter.com/download/iphone\" rel=\"nofollow\">Twitter for iPhone</a>",
      "entities" : {
        "user_mentions" : [ ],
        "urls" : [ ],
        "symbols" : [ ],
        "media" : [
          {
            "expanded_url" : "https://twitter.com/smithjd/status/1552679756239441920/photo/1",
            "indices" : [
              "79",
              "102"
            ],
            "url" : "https://t.co/fhrgyXeFc2",
            "media_url" : "http://pbs.twimg.com/media/FYw6AfMXwAEKcPJ.jpg",
            "id_str" : "1552679751583776769",
            "id" : "1552679751583776769",
            "media_url_https" : "https://pbs.twimg.com/media/FYw6AfMXwAEKcPJ.jpg",
            "sizes" : {
              "medium" : {
                "w" : "1200",
                "h" : "900",
                "resize" : "fit"
              },
              "small" : {
                "w" : "680",
                "h" : "510",
                "resize" : "fit"
              },
              "thumb" : {
                "w" : "150",
                "h" : "150",
                "resize" : "crop"
              },
              "large" : {
                "w" : "2048",
                "h" : "1536",
                "resize" : "fit"
              }
            },
            "type" : "photo",
            "display_url" : "pic.twitter.com/fhrgyXeFc2"
          }
        ],
        "hashtags" : [
          {
            "text" : "rstudioconf2022",
            "indices" : [
              "62",
              "78"
            ]
          }
        ]
      },
      "display_text_range" : [
        "0",
        "102"
      ],
      "favorite_count" : "14",
      "id_str" : "1552679756239441920",
      "truncated" : false,
      "retweet_count" : "5",
      "id" : "1552679756239441920",
      "possibly_sensitive" : false,
      "created_at" : "Thu Jul 28 15:37:55 +0000 2022",
      "favorited" : false,
      "full_text" : "Awesome simultaneous conversation with presenters from Africa #rstudioconf2022 https://t.co/fhrgyXeFc2",
      "lang" : "en",
      "extended_entities" : {
        "media" : [
          {
            "expanded_url" : "https://twitter.com/smithjd/status/1552679756239441920/photo/1",
            "indices" : [
              "79",
              "102"
            ],
            "url" : "https://t.co/fhrgyXeFc2",
            "media_url" : "http://pbs.twimg.com/media/FYw6AfMXwAEKcPJ.jpg",
            "id_str" : "1552679751583776769",
            "id" : "1552679751583776769",
            "media_url_https" : "https://pbs.twimg.com/media/FYw6AfMXwAEKcPJ.jpg",
            "sizes" : {
              "medium" : {
                "w" : "1200",
                "h" : "900",
                "resize" : "fit"
              },
              "small" : {
                "w" : "680",
                "h" : "510",
                "resize" : "fit"
              },
              "thumb" : {
                "w" : "150",
                "h" : "150",
                "resize" : "crop"
              },
              "large" : {
                "w" : "2048",
                "h" : "1536",
                "resize" : "fit"
              }
            },
            "type" : "photo",
            "display_url" : "pic.twitter.com/fhrgyXeFc2"
          }
        ]
      }
    }
  },
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1552318600203190273"
          ],
          "editableUntil" : "2022-07-27T16:12:49.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : false
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"https://mobile.twitter.com\" rel=\"nofollow\">Twitter Web App</a>",
      "entities" : {
        "hashtags" : [
          {
            "text" : "RStudioConf",
            "indices" : [
              "98",
              "110"
            ]
          }
        ],
        "symbols" : [ ],
        "user_mentions" : [ ],
        "urls" : [ ]
      },
      "display_text_range" : [
        "0",
        "110"
      ],
      "favorite_count" : "1",
      "in_reply_to_status_id_str" : "1552312411591417860",
      "id_str" : "1552318600203190273",
      "in_reply_to_user_id" : "5838832",
      "truncated" : false,
      "retweet_count" : "0",
      "id" : "1552318600203190273",
      "in_reply_to_status_id" : "1552312411591417860",
      "created_at" : "Wed Jul 27 15:42:49 +0000 2022",
      "favorited" : false,
      "full_text" : "So far it looks like we'll have Jewish, Episcopalian, and Buddhist perspectives and experiences.  #RStudioConf",
      "lang" : "en",
      "in_reply_to_screen_name" : "smithjd",
      "in_reply_to_user_id_str" : "5838832"
    }
  },
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1552312824818458627"
          ],
          "editableUntil" : "2022-07-27T15:49:52.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : false
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"https://mobile.twitter.com\" rel=\"nofollow\">Twitter Web App</a>",
      "entities" : {
        "hashtags" : [ ],
        "symbols" : [ ],
        "user_mentions" : [ ],
        "urls" : [
          {
            "url" : "https://t.co/FeROEoyDro",
            "expanded_url" : "https://learningalliances.net/2022/07/musing-about-data-analytics-in-faith-based-organizations/",
            "display_url" : "learningalliances.net/2022/07/musing…",
            "indices" : [
              "100",
              "123"
            ]
          }
        ]
      },
      "display_text_range" : [
        "0",
        "123"
      ],
      "favorite_count" : "0",
      "in_reply_to_status_id_str" : "1552312411591417860",
      "id_str" : "1552312824818458627",
      "in_reply_to_user_id" : "5838832",
      "truncated" : false,
      "retweet_count" : "0",
      "id" : "1552312824818458627",
      "in_reply_to_status_id" : "1552312411591417860",
      "possibly_sensitive" : false,
      "created_at" : "Wed Jul 27 15:19:52 +0000 2022",
      "favorited" : false,
      "full_text" : "Here are some musings about the issues based on my recent experiences to kick off the conversation. https://t.co/FeROEoyDro",
      "lang" : "en",
      "in_reply_to_screen_name" : "smithjd",
      "in_reply_to_user_id_str" : "5838832"
    }
  },
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1552312651593703426"
          ],
          "editableUntil" : "2022-07-27T15:49:11.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : false
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"https://mobile.twitter.com\" rel=\"nofollow\">Twitter Web App</a>",
      "entities" : {
        "hashtags" : [ ],
        "symbols" : [ ],
        "user_mentions" : [ ],
        "urls" : [ ]
      },
      "display_text_range" : [
        "0",
        "123"
      ],
      "favorite_count" : "0",
      "in_reply_to_status_id_str" : "1552312411591417860",
      "id_str" : "1552312651593703426",
      "in_reply_to_user_id" : "5838832",
      "truncated" : false,
      "retweet_count" : "0",
      "id" : "1552312651593703426",
      "in_reply_to_status_id" : "1552312411591417860",
      "created_at" : "Wed Jul 27 15:19:11 +0000 2022",
      "favorited" : false,
      "full_text" : "Let's talk about how data analytics can support religious or faith-based traditions and organizations. What are the issues?",
      "lang" : "en",
      "in_reply_to_screen_name" : "smithjd",
      "in_reply_to_user_id_str" : "5838832"
    }
  },
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1552312411591417860"
          ],
          "editableUntil" : "2022-07-27T15:48:14.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : false
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"https://mobile.twitter.com\" rel=\"nofollow\">Twitter Web App</a>",
      "entities" : {
        "hashtags" : [
          {
            "text" : "RstudioConf",
            "indices" : [
              "174",
              "186"
            ]
          }
        ],
        "symbols" : [ ],
        "user_mentions" : [ ],
        "urls" : [
          {
            "url" : "https://t.co/7ZvOgpGQbM",
            "expanded_url" : "https://sched.co/137li",
            "display_url" : "sched.co/137li",
            "indices" : [
              "127",
              "150"
            ]
          }
        ]
      },
      "display_text_range" : [
        "0",
        "186"
      ],
      "favorite_count" : "0",
      "id_str" : "1552312411591417860",
      "truncated" : false,
      "retweet_count" : "0",
      "id" : "1552312411591417860",
      "possibly_sensitive" : false,
      "created_at" : "Wed Jul 27 15:18:14 +0000 2022",
      "favorited" : false,
      "full_text" : "I'm excited to convene a BoF about data analytics in support of religious or faith based organizations  at rstudio::conf(2022) https://t.co/7ZvOgpGQbM  -- Thursday Breakfast #RstudioConf",
      "lang" : "en"
    }
  },
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1551253602848628736"
          ],
          "editableUntil" : "2022-07-24T17:40:54.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : false
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"https://mobile.twitter.com\" rel=\"nofollow\">Twitter Web App</a>",
      "entities" : {
        "hashtags" : [
          {
            "text" : "Rstats",
            "indices" : [
              "73",
              "80"
            ]
          }
        ],
        "symbols" : [ ],
        "user_mentions" : [
          {
            "name" : "Asmae Toumi",
            "screen_name" : "asmae_toumi",
            "indices" : [
              "0",
              "12"
            ],
            "id_str" : "896072378844934144",
            "id" : "896072378844934144"
          }
        ],
        "urls" : [ ]
      },
      "display_text_range" : [
        "0",
        "136"
      ],
      "favorite_count" : "1",
      "in_reply_to_status_id_str" : "1551247340991926275",
      "id_str" : "1551253602848628736",
      "in_reply_to_user_id" : "896072378844934144",
      "truncated" : false,
      "retweet_count" : "1",
      "id" : "1551253602848628736",
      "in_reply_to_status_id" : "1551247340991926275",
      "created_at" : "Sun Jul 24 17:10:54 +0000 2022",
      "favorited" : false,
      "full_text" : "@asmae_toumi Indeed.  With a food court, multiple \"theaters\" (with great #Rstats superheros), a gym, and probably plenty of parking! :-)",
      "lang" : "en",
      "in_reply_to_screen_name" : "asmae_toumi",
      "in_reply_to_user_id_str" : "896072378844934144"
    }
  },
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1551247079493849089"
          ],
          "editableUntil" : "2022-07-24T17:14:59.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : false
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"https://mobile.twitter.com\" rel=\"nofollow\">Twitter Web App</a>",
      "entities" : {
        "user_mentions" : [
          {
            "name" : "Asmae Toumi",
            "screen_name" : "asmae_toumi",
            "indices" : [
              "0",
              "12"
            ],
            "id_str" : "896072378844934144",
            "id" : "896072378844934144"
          }
        ],
        "urls" : [ ],
        "symbols" : [ ],
        "media" : [
          {
            "expanded_url" : "https://twitter.com/smithjd/status/1551247079493849089/photo/1",
            "indices" : [
              "82",
              "105"
            ],
            "url" : "https://t.co/hSriJUwE9z",
            "media_url" : "http://pbs.twimg.com/media/FYci-AWXoAA1L6j.jpg",
            "id_str" : "1551247045293481984",
            "id" : "1551247045293481984",
            "media_url_https" : "https://pbs.twimg.com/media/FYci-AWXoAA1L6j.jpg",
            "sizes" : {
              "medium" : {
                "w" : "1000",
                "h" : "750",
                "resize" : "fit"
              },
              "large" : {
                "w" : "1000",
                "h" : "750",
                "resize" : "fit"
              },
              "small" : {
                "w" : "680",
                "h" : "510",
                "resize" : "fit"
              },
              "thumb" : {
                "w" : "150",
                "h" : "150",
                "resize" : "crop"
              }
            },
            "type" : "photo",
            "display_url" : "pic.twitter.com/hSriJUwE9z"
          }
        ],
        "hashtags" : [
          {
            "text" : "RStudioConf",
            "indices" : [
              "69",
              "81"
            ]
          }
        ]
      },
      "display_text_range" : [
        "0",
        "105"
      ],
      "favorite_count" : "13",
      "in_reply_to_status_id_str" : "1550925858185125889",
      "id_str" : "1551247079493849089",
      "in_reply_to_user_id" : "896072378844934144",
      "truncated" : false,
      "retweet_count" : "1",
      "id" : "1551247079493849089",
      "in_reply_to_status_id" : "1550925858185125889",
      "possibly_sensitive" : false,
      "created_at" : "Sun Jul 24 16:44:59 +0000 2022",
      "favorited" : false,
      "full_text" : "@asmae_toumi So exciting!  Here's a picture of the venue: it's HUGE! #RStudioConf https://t.co/hSriJUwE9z",
      "lang" : "en",
      "in_reply_to_screen_name" : "asmae_toumi",
      "in_reply_to_user_id_str" : "896072378844934144",
      "extended_entities" : {
        "media" : [
          {
            "expanded_url" : "https://twitter.com/smithjd/status/1551247079493849089/photo/1",
            "indices" : [
              "82",
              "105"
            ],
            "url" : "https://t.co/hSriJUwE9z",
            "media_url" : "http://pbs.twimg.com/media/FYci-AWXoAA1L6j.jpg",
            "id_str" : "1551247045293481984",
            "id" : "1551247045293481984",
            "media_url_https" : "https://pbs.twimg.com/media/FYci-AWXoAA1L6j.jpg",
            "sizes" : {
              "medium" : {
                "w" : "1000",
                "h" : "750",
                "resize" : "fit"
              },
              "large" : {
                "w" : "1000",
                "h" : "750",
                "resize" : "fit"
              },
              "small" : {
                "w" : "680",
                "h" : "510",
                "resize" : "fit"
              },
              "thumb" : {
                "w" : "150",
                "h" : "150",
                "resize" : "crop"
              }
            },
            "type" : "photo",
            "display_url" : "pic.twitter.com/hSriJUwE9z"
          }
        ]
      }
    }
  },
  {
    "tweet" : {
      "edit_info" : {
        "initial" : {
          "editTweetIds" : [
            "1533261720847716352"
          ],
          "editableUntil" : "2022-06-05T02:07:35.000Z",
          "editsRemaining" : "5",
          "isEditEligible" : true
        }
      },
      "retweeted" : false,
      "source" : "<a href=\"http://twitter.com/download/iphone\" rel=\"nofollow\">Twitter for iPhone</a>",
      "entities" : {
        "user_mentions" : [ ],
        "urls" : [ ],
        "symbols" : [ ],
        "media" : [
          {
            "expanded_url" : "https://twitter.com/smithjd/status/1533261720847716352/video/1",
            "indices" : [
              "5",
              "28"
            ],
            "url" : "https://t.co/Ju8KDcQCzq",
            "media_url" : "http://pbs.twimg.com/ext_tw_video_thumb/1533261653235576832/pu/img/P0AN80QThvRXPdzH.jpg",
            "id_str" : "1533261653235576832",
            "id" : "1533261653235576832",
            "media_url_https" : "https://pbs.twimg.com/ext_tw_video_thumb/1533261653235576832/pu/img/P0AN80QThvRXPdzH.jpg",
            "sizes" : {
              "large" : {
                "w" : "1280",
                "h" : "720",
                "resize" : "fit"
              },
              "medium" : {
                "w" : "1200",
                "h" : "675",
                "resize" : "fit"
              },
              "thumb" : {
                "w" : "150",
                "h" : "150",
                "resize" : "crop"
              },
              "small" : {
                "w" : "680",
                "h" : "383",
                "resize" : "fit"
              }
            },
            "type" : "photo",
            "display_url" : "pic.twitter.com/Ju8KDcQCzq"
          }
        ],
        "hashtags" : [ ]
      },
      "display_text_range" : [
        "0",
        "28"
      ],
      "favorite_count" : "2",
      "id_str" : "1533261720847716352",
      "truncated" : false,
      "retweet_count" : "0",
      "id" : "1533261720847716352",
      "possibly_sensitive" : false,
      "created_at" : "Sun Jun 05 01:37:35 +0000 2022",
      "favorited" : false,
      "full_text" : "Rain https://t.co/Ju8KDcQCzq",
      "lang" : "en",
      "extended_entities" : {
        "media" : [
          {
            "expanded_url" : "https://twitter.com/smithjd/status/1533261720847716352/video/1",
            "indices" : [
              "5",
              "28"
            ],
            "url" : "https://t.co/Ju8KDcQCzq",
            "media_url" : "http://pbs.twimg.com/ext_tw_video_thumb/1533261653235576832/pu/img/P0AN80QThvRXPdzH.jpg",
            "id_str" : "1533261653235576832",
            "video_info" : {
              "aspect_ratio" : [
                "16",
                "9"
              ],
              "duration_millis" : "31300",
              "variants" : [
                {
                  "bitrate" : "256000",
                  "content_type" : "video/mp4",
                  "url" : "https://video.twimg.com/ext_tw_video/1533261653235576832/pu/vid/480x270/GaGfGt_iqpuyyjog.mp4?tag=12"
                },
                {
                  "bitrate" : "832000",
                  "content_type" : "video/mp4",
                  "url" : "https://video.twimg.com/ext_tw_video/1533261653235576832/pu/vid/640x360/Sm5Jf2dZHX5aZeoV.mp4?tag=12"
                },
                {
                  "bitrate" : "2176000",
                  "content_type" : "video/mp4",
                  "url" : "https://video.twimg.com/ext_tw_video/1533261653235576832/pu/vid/1280x720/RjcxOl0Q_qjBrk9h.mp4?tag=12"
                },
                {
                  "content_type" : "application/x-mpegURL",
                  "url" : "https://video.twimg.com/ext_tw_video/1533261653235576832/pu/pl/iF6Fi9OnFm-ya9Kr.m3u8?tag=12&container=fmp4"
                }
              ]
            },
            "additional_media_info" : {
              "monetizable" : false
            },
            "id" : "1533261653235576832",
            "media_url_https" : "https://pbs.twimg.com/ext_tw_video_thumb/1533261653235576832/pu/img/P0AN80QThvRXPdzH.jpg",
            "sizes" : {
              "large" : {
                "w" : "1280",
                "h" : "720",
                "resize" : "fit"
              },
              "medium" : {
                "w" : "1200",
                "h" : "675",
                "resize" : "fit"
              },
              "thumb" : {
                "w" : "150",
                "h" : "150",
                "resize" : "crop"
              },
              "small" : {
                "w" : "680",
                "h" : "383",
                "resize" : "fit"
              }
            },
            "type" : "video",
            "display_url" : "pic.twitter.com/Ju8KDcQCzq"
          }
        ]
      }
    }
  }
]