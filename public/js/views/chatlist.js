/*
 * The chat lines. Follows the newest line only while the reader is at the
 * bottom; a reader scrolled up keeps their place and gets a "New messages"
 * button instead.
 */
(function (ChatApp, Backbone, _) {
  'use strict';

  var BOTTOM_SLACK = 24; // px from the bottom that still counts as "at the bottom"

  var ChatLineView = Backbone.View.extend({
    tagName: 'li',
    template: ChatApp.template('chat-line-template'),

    initialize: function (options) {
      this.me = options.me;
      this.listenTo(this.model, 'change', this.render);
    },

    render: function () {
      var data = this.model.view();
      var mine = data.kind === 'chat' && data.sender === this.me();
      this.el.className = 'chat-line chat-' + data.kind + (mine ? ' chat-mine' : '');
      if (data.position !== undefined) {
        this.el.setAttribute('data-position', data.position);
      }
      this.$el.html(this.template(data));
      return this;
    }
  });

  ChatApp.views.ChatListView = Backbone.View.extend({
    events: {},

    initialize: function (options) {
      this.scroller = options.scroller; // the scrolling element around the list
      this.newBelow = options.newBelow; // the "New messages" button
      this.me = options.me;             // function: the logged-in name
      this.lineViews = {};
      this.listenTo(this.collection, 'add', this.added);
      this.listenTo(this.collection, 'remove', this.removed);
      this.listenTo(this.collection, 'reset', this.render);
      this.onScroll = _.bind(this.scrolled, this);
      this.scroller.addEventListener('scroll', this.onScroll, { passive: true });
      this.newBelow.addEventListener('click', _.bind(this.scrollToBottom, this));
    },

    render: function () {
      _.invoke(_.values(this.lineViews), 'remove');
      this.lineViews = {};
      var fragment = document.createDocumentFragment();
      this.collection.each(function (model) {
        fragment.appendChild(this.lineView(model).el);
      }, this);
      this.el.appendChild(fragment);
      this.scrollToBottom();
      return this;
    },

    lineView: function (model) {
      var view = new ChatLineView({ model: model, me: this.me }).render();
      this.lineViews[model.cid] = view;
      return view;
    },

    atBottom: function () {
      var s = this.scroller;
      return s.scrollHeight - s.scrollTop - s.clientHeight <= BOTTOM_SLACK;
    },

    added: function (model, collection) {
      var wasAtBottom = this.atBottom();
      var oldHeight = this.scroller.scrollHeight;
      var oldTop = this.scroller.scrollTop;
      // The first later line already on screen (several lines added at once
      // fire their `add` events after all of them are in the collection).
      var nextView = null;
      for (var i = collection.indexOf(model) + 1; i < collection.length && !nextView; i++) {
        nextView = this.lineViews[collection.at(i).cid] || null;
      }
      var el = this.lineView(model).el;
      if (nextView) {
        this.el.insertBefore(el, nextView.el);
      } else {
        this.el.appendChild(el);
      }
      if (wasAtBottom) {
        this.scrollToBottom();
      } else if (nextView) {
        // Inserted above (older history): keep the lines being read in place.
        this.scroller.scrollTop = oldTop + (this.scroller.scrollHeight - oldHeight);
      } else {
        this.newBelow.classList.remove('d-none');
      }
    },

    removed: function (model) {
      var view = this.lineViews[model.cid];
      if (view) {
        view.remove();
        delete this.lineViews[model.cid];
      }
    },

    scrolled: function () {
      if (this.atBottom()) {
        this.newBelow.classList.add('d-none');
      }
    },

    scrollToBottom: function () {
      this.scroller.scrollTop = this.scroller.scrollHeight;
      this.newBelow.classList.add('d-none');
    },

    remove: function () {
      this.scroller.removeEventListener('scroll', this.onScroll);
      _.invoke(_.values(this.lineViews), 'remove');
      return Backbone.View.prototype.remove.call(this);
    }
  });
})(ChatApp, Backbone, _);
